"""``make run`` (``mailroom dev``): migrations, four services, URLs and a token; Ctrl-C stops."""

from __future__ import annotations

import re
import signal

import httpx2

from shared.db.migrate import head_revision
from tests.support.processes import ServiceProcess
from tests.support.tcp import closed_port


def test_make_run_brings_up_the_system_and_stops_on_ctrl_c() -> None:
    api_port, status_port = closed_port(), closed_port()
    stack = ServiceProcess(
        "dev",
        "--tenant",
        "acme",
        env={"MAILROOM_API_PORT": str(api_port), "MAILROOM_STATUS_PORT": str(status_port)},
    )
    try:
        stack.wait_for_log("Mailroom is running", timeout=60)
        log = stack.log()
        assert f"database schema at revision {head_revision()}" in log
        assert f"http://127.0.0.1:{api_port}/api/v1" in log
        assert f"http://127.0.0.1:{status_port}" in log
        for service in ("fetcher", "sender", "status"):
            stack.wait_for_log(f"{service}: connected to RabbitMQ, consuming", timeout=30)
        token = re.search(r"^(eyJ[\w-]+\.[\w-]+\.[\w-]+)$", log, re.MULTILINE)
        assert token is not None, log
        answer = httpx2.get(
            f"http://127.0.0.1:{api_port}/api/v1/email-servers",
            headers={"Authorization": f"Bearer {token.group(1)}"},
        )
        assert answer.status_code == 200
        assert httpx2.get(f"http://127.0.0.1:{status_port}/healthz").status_code == 200

        stack.process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert stack.terminate(timeout=20) == 0
        assert stack.log().rstrip().endswith("stopped.")
        assert "Traceback" not in stack.log()
    finally:
        stack.kill()
