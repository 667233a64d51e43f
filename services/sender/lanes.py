"""First attempts queued per SMTP server, so a slow, dead or rate-limited server delays only its
own mail.

Each server has a lane: a queue of jobs served by at most ``per_lane`` threads of its own (the
connections the sender may hold to one server), started when work arrives and ended when the
lane is empty. A thread of a lane only ever holds that lane's jobs, so a server that never
answers ties up its own threads, never another server's. A lane holds at most ``queue_limit``
jobs: a job beyond that goes to the overflow lane instead (``overflow``, which parks it as a
retry: its command is acked, and the broker's prefetch is not filled by one server's backlog).
``max_threads`` bounds the threads of all lanes together; a lane that finds none free waits for
the next thread that finishes its own lane.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

Job = TypeVar("Job")
OVERFLOW = "overflow"  # the lane that parks jobs over another lane's limit


@dataclass
class _Lane(Generic[Job]):
    jobs: deque[Job] = field(default_factory=deque)
    threads: int = 0


class Lanes(Generic[Job]):
    def __init__(
        self,
        run: Callable[[Job], None],
        overflow: Callable[[Job], None],
        *,
        per_lane: int,
        queue_limit: int,
        max_threads: int,
    ) -> None:
        self._run = {OVERFLOW: overflow}
        self._default_run = run
        self._per_lane = max(1, per_lane)
        self._queue_limit = max(1, queue_limit)
        self._max_threads = max(1, max_threads)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._lanes: dict[str, _Lane[Job]] = {}
        self._starved: deque[str] = deque()  # lanes with jobs and no thread (at max_threads)
        self._threads = 0
        self._stopping = False

    def submit(self, key: str, job: Job) -> None:
        with self._lock:
            lane = self._lanes.setdefault(key, _Lane())
            if key != OVERFLOW and len(lane.jobs) >= self._queue_limit:
                key, lane = OVERFLOW, self._lanes.setdefault(OVERFLOW, _Lane())
            lane.jobs.append(job)
            start = self._claim_thread(key, lane)
        if start:
            self._start(key)

    def queued(self, key: str) -> int:
        with self._lock:
            lane = self._lanes.get(key)
            return len(lane.jobs) if lane else 0

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._threads > 0 or any(lane.jobs for lane in self._lanes.values())

    def let_go(self) -> list[Job]:
        """Take every job not started yet out of the lanes (their commands are not acked: the
        broker delivers them again)."""
        with self._lock:
            taken = [job for lane in self._lanes.values() for job in lane.jobs]
            for lane in self._lanes.values():
                lane.jobs.clear()
            self._starved.clear()
        return taken

    def stop(self, timeout: float) -> None:
        """No new threads; waits up to ``timeout`` for the running jobs to end."""
        with self._lock:
            self._stopping = True
            self._idle.wait_for(lambda: self._threads == 0, timeout)

    # --- the lanes' threads ----------------------------------------------------------------

    def _claim_thread(self, key: str, lane: _Lane[Job]) -> bool:
        """With the lock held: whether to start a thread for ``key`` now."""
        if self._stopping or lane.threads >= self._per_lane:
            return False
        if self._threads >= self._max_threads:
            if key not in self._starved:
                self._starved.append(key)
            return False
        lane.threads += 1
        self._threads += 1
        return True

    def _start(self, key: str) -> None:
        threading.Thread(
            target=self._serve, args=(key,), name=f"mailroom-sender-lane-{key[:8]}", daemon=True
        ).start()

    def _serve(self, key: str) -> None:
        while (taken := self._next(key)) is not None:
            key, job = taken
            try:
                self._run.get(key, self._default_run)(job)
            except Exception:  # the runner handles its own failures; this is a last guard
                log.exception("sender: a job of lane %s failed unexpectedly", key)

    def _next(self, key: str) -> tuple[str, Job] | None:
        """The next job of this thread's lane; when it is empty, of a starved lane, which the
        thread serves from then on; None: the thread ends."""
        with self._lock:
            lane = self._lanes[key]
            if lane.jobs and not self._stopping:
                return key, lane.jobs.popleft()
            lane.threads -= 1
            if not lane.jobs and not lane.threads:
                del self._lanes[key]
            while self._starved and not self._stopping:
                starved = self._starved.popleft()
                waiting = self._lanes.get(starved)
                if waiting is not None and waiting.jobs and waiting.threads < self._per_lane:
                    waiting.threads += 1
                    return starved, waiting.jobs.popleft()
            self._threads -= 1
            self._idle.notify_all()
            return None
