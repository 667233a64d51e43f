"""Mailbox leases in the real Redis: a burst of callers waits its turn, an outage is named."""

from __future__ import annotations

import threading
import uuid

import pytest

from shared.leases import Leases, LeasesUnavailable
from shared.redis_client import redis_client
from shared.settings import Settings
from tests.support.tcp import closed_port

THREADS = 300  # the fetcher runs one thread per mailbox; the benchmark has 500


def test_a_burst_of_lease_calls_from_many_threads_waits_for_a_connection_instead_of_failing(
    settings: Settings,
) -> None:
    """Every poller takes its lease at start and gives it back at stop, all at once."""
    leases = Leases(redis_client(settings.redis_url, max_connections=4), "burst", 10)
    names = [f"test-burst-{uuid.uuid4()}" for _ in range(THREADS)]
    start = threading.Barrier(THREADS)
    errors: list[BaseException] = []
    taken: list[str] = []

    def poller(name: str) -> None:
        try:
            start.wait()
            if leases.acquire(name) and leases.renew(name):
                taken.append(name)
            leases.release(name)
        except BaseException as error:  # noqa: BLE001 - collected for the assertion
            errors.append(error)

    threads = [threading.Thread(target=poller, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert sorted(taken) == sorted(names)
    assert all(leases.holder(name) is None for name in names)


def test_redis_being_away_is_leases_unavailable_not_a_client_library_error() -> None:
    leases = Leases(redis_client(f"redis://127.0.0.1:{closed_port()}/0"), "away", 10)
    with pytest.raises(LeasesUnavailable, match=r"^Redis unavailable: "):
        leases.acquire("test-away")
    with pytest.raises(LeasesUnavailable):
        leases.release("test-away")
