"""Per-server lanes and breakers: one server's trouble holds up only its own mail."""

from __future__ import annotations

import threading
import time

from services.sender.breaker import Breakers
from services.sender.lanes import Lanes
from shared.contracts.status_reports import FailureCategory


def wait_until(condition: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return True
        time.sleep(0.01)
    return False


def test_a_server_that_never_answers_holds_only_its_own_lane() -> None:
    hung = threading.Event()
    done: list[str] = []
    parked: list[str] = []

    def run(job: str) -> None:
        if job.startswith("dead"):
            hung.wait(10)
        done.append(job)

    lanes: Lanes[str] = Lanes(run, parked.append, per_lane=2, queue_limit=3, max_threads=8)
    for n in range(10):
        lanes.submit("dead-server", f"dead-{n}")
    for n in range(5):
        lanes.submit("healthy", f"ok-{n}")
    assert wait_until(lambda: len(done) == 5)
    assert done == [f"ok-{n}" for n in range(5)]  # none waited behind the dead server
    # Two in the dead server's threads, three queued, the rest parked at once.
    assert wait_until(lambda: len(parked) == 5)
    assert lanes.queued("dead-server") == 3
    hung.set()
    assert wait_until(lambda: len(done) == 10)
    lanes.stop(5)


def test_a_lane_that_finds_no_free_thread_is_served_by_the_next_one_that_finishes() -> None:
    gate = threading.Event()
    done: list[str] = []

    def run(job: str) -> None:
        if job == "first":
            gate.wait(10)
        done.append(job)

    lanes: Lanes[str] = Lanes(run, done.append, per_lane=1, queue_limit=10, max_threads=1)
    lanes.submit("a", "first")
    lanes.submit("b", "second")  # no thread left: it waits for the first to finish
    time.sleep(0.2)
    assert done == []
    gate.set()
    assert wait_until(lambda: done == ["first", "second"])
    assert wait_until(lambda: not lanes.busy)
    lanes.stop(5)


def test_a_breaker_opens_on_an_unreachable_server_and_cools_off() -> None:
    breakers = Breakers(base_seconds=0.2, max_seconds=1.0)
    breakers.failed("s1", FailureCategory.PROTOCOL, "550 refused")  # the mail's fault
    assert breakers.blocked("s1") is None
    breakers.failed("s1", FailureCategory.TIMEOUT, "no answer from s1 in time")
    blocked = breakers.blocked("s1")
    assert blocked is not None and blocked.reason == "no answer from s1 in time"
    assert breakers.blocked("s2") is None  # another server is not affected
    assert wait_until(lambda: breakers.blocked("s1") is None, timeout=1.0)  # cooled off
    breakers.failed("s1", FailureCategory.TIMEOUT, "again")
    breakers.succeeded("s1")
    assert breakers.blocked("s1") is None
