"""What a piece of work costs in memory: Python allocations in this process, RSS of another.

- ``traced_growth()`` measures the peak of Python's allocations (every thread, ``tracemalloc``)
  inside a block, above where the block started: what a hostile server made this process hold
  at the worst moment. Tracing slows allocation-heavy code down a few times.
- ``RssWatch(pid)`` watches another process from outside: its resident set (``VmRSS``) before,
  sampled during and after a block, and the kernel's own peak (``VmHWM``, reset at the start
  through ``/proc/<pid>/clear_refs``), so that a spike between two samples still counts.
- ``cost_in_fresh_process(work)`` runs ``work`` at full speed in a new process and reports its
  RSS before and at the peak: everything it allocated (C libraries too), in a heap that no
  earlier test left free memory in.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import Any

MiB = 1024 * 1024


def in_mib(count: int) -> str:
    return f"{count / MiB:.1f} MiB"


@dataclass
class TracedGrowth:
    """Bytes of Python allocations above the start, at their peak (set when the block ends)."""

    peak: int = 0


@contextmanager
def traced_growth() -> Iterator[TracedGrowth]:
    """The peak growth of Python's allocations inside the block, in every thread."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    start, _ = tracemalloc.get_traced_memory()
    growth = TracedGrowth()
    try:
        yield growth
    finally:
        _, peak = tracemalloc.get_traced_memory()
        growth.peak = max(0, peak - start)
        if not was_tracing:
            tracemalloc.stop()


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise LookupError(f"/proc/{pid}/status has no {field}")


def rss(pid: int) -> int:
    """The process's resident set now, in bytes."""
    return _status_kib(pid, "VmRSS") * 1024


def peak_rss(pid: int) -> int:
    """The highest resident set since the last ``reset_peak_rss`` (or the start), in bytes."""
    return _status_kib(pid, "VmHWM") * 1024


def reset_peak_rss(pid: int) -> None:
    """From now on ``VmHWM`` counts from the current resident set (Linux: clear_refs 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@dataclass(frozen=True)
class RssReport:
    before: int
    peak: int
    after: int

    @property
    def growth(self) -> int:
        """How far the peak rose above where the block started."""
        return max(0, self.peak - self.before)

    def __str__(self) -> str:
        return (
            f"RSS before {in_mib(self.before)}, peak {in_mib(self.peak)}, "
            f"after {in_mib(self.after)} (growth {in_mib(self.growth)})"
        )


class RssWatch:
    """Samples a process's RSS every ``every`` seconds inside a ``with`` block."""

    def __init__(self, pid: int, every: float = 0.005) -> None:
        self.pid = pid
        self.every = every
        self.report: RssReport | None = None
        self._before = 0
        self._highest = 0
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> RssWatch:
        reset_peak_rss(self.pid)
        self._before = self._highest = rss(self.pid)
        self._sampler.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done.set()
        self._sampler.join(5)
        peak = max(self._highest, peak_rss(self.pid))
        self.report = RssReport(self._before, peak, rss(self.pid))

    def _sample(self) -> None:
        while not self._done.wait(self.every):
            self._highest = max(self._highest, rss(self.pid))


# --- a fresh process, measured from inside -------------------------------------------------------

# Children are forked from a server process that never ran a thread of the test session, so
# that no lock of this process comes along, and each starts with the modules already imported.
_FRESH = multiprocessing.get_context("forkserver")


def cost_in_fresh_process(
    work: Callable[..., Any],
    *args: Any,
    warm_up: Callable[..., Any] | None = None,
    timeout: float = 60.0,
) -> tuple[Any, RssReport]:
    """``work(*args)``'s result and RSS in a new process, after ``warm_up(*args)`` (not
    measured: imports, TLS contexts, the first connection's buffers).

    ``work`` and ``warm_up`` must be module-level functions; their module is imported once by
    the server process the children are forked from (the first caller's module counts).
    """
    _FRESH.set_forkserver_preload([work.__module__])
    receiving, sending = _FRESH.Pipe(duplex=False)
    child = _FRESH.Process(target=_measure, args=(sending, work, warm_up, args), daemon=True)
    child.start()
    sending.close()
    try:
        if not receiving.poll(timeout):
            raise TimeoutError(f"{work.__name__} did not end within {timeout:g} s")
        outcome, value, report = receiving.recv()
    finally:
        if child.is_alive():
            child.kill()
        child.join(5)
        receiving.close()
    if outcome == "raised":
        raise RuntimeError(f"{work.__name__} failed in its process: {value}")
    return value, report


def _measure(
    sending: Connection,
    work: Callable[..., Any],
    warm_up: Callable[..., Any] | None,
    args: tuple[Any, ...],
) -> None:
    try:
        if warm_up is not None:
            warm_up(*args)
        pid = os.getpid()
        reset_peak_rss(pid)
        before = rss(pid)
        value = work(*args)
        report = RssReport(before, max(peak_rss(pid), rss(pid)), rss(pid))
        sending.send(("returned", value, report))
    except Exception as error:  # noqa: BLE001 - reported to the test in its own process
        sending.send(("raised", repr(error), None))
    finally:
        sending.close()
