"""Run ``mailroom`` commands as real processes, the way ``make run`` and containers do."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

MAILROOM = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "mailroom")
LOG_FILES: list[Path] = []  # every service log of the session, for the secret-leak check


class ServiceProcess:
    """``mailroom run SERVICE`` in the background, its log in a file the test can read."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.log_file = Path(tempfile.mkstemp(prefix="mailroom-", suffix=".log")[1])
        LOG_FILES.append(self.log_file)
        self._log = self.log_file.open("wb")
        self.process = subprocess.Popen(
            [MAILROOM, *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            # Its own process group: ``kill`` takes the children along (``mailroom dev``
            # starts four services; orphans would go on consuming the suite's queues).
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_file.read_text(encoding="utf-8", errors="replace")

    def wait_for_log(self, text: str | Callable[[str], bool], timeout: float = 10.0) -> float:
        """Seconds until the log shows ``text``; fails with the log when it does not."""
        started = time.monotonic()
        check = text if callable(text) else (lambda log: text in log)
        while time.monotonic() - started < timeout:
            if check(self.log()):
                return time.monotonic() - started
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"log never showed {text!r}; log:\n{self.log()[-3000:]}")

    def terminate(self, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait(5)
        self._log.close()
