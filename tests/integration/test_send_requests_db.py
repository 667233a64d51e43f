"""The send_requests statements the sender uses, against the real PostgreSQL.

The lock :func:`~shared.db.send_requests.start` takes in SQL must be the very lock every other
reader takes by :func:`~shared.db.send_requests.lock_key`, and a finish must record the outcome
and give the lock back in one commit.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import psycopg
import pytest
from psycopg.rows import dict_row

from shared.db import send_requests as repo
from shared.db.pool import DictConnection
from shared.settings import Settings

TENANT = "tenant-db"


@pytest.fixture
def worker_and_other(settings: Settings) -> Iterator[tuple[DictConnection, DictConnection]]:
    """Two autocommit sessions, as the sender's delivery threads have them."""
    sessions = [
        cast(
            DictConnection,
            psycopg.connect(settings.database_url, autocommit=True, row_factory=dict_row),
        )
        for _ in range(2)
    ]
    try:
        yield sessions[0], sessions[1]
    finally:
        for session in sessions:
            session.close()


def _start(session: DictConnection, request_id: str) -> repo.Started:
    return repo.start(session, TENANT, request_id, 60.0)


def _command(request_id: str) -> dict[str, Any]:
    return {"request_id": request_id, "tenant_id": TENANT, "to": ["a@example.org"]}


def _locked_elsewhere(other: DictConnection, request_id: str) -> bool:
    locked, _ = repo.lock_and_get(other, TENANT, request_id)
    if locked:
        repo.unlock(other, TENANT, request_id)
    return not locked


def test_a_new_request_is_recorded_claimed_and_holds_the_lock_others_ask_for(
    worker_and_other: tuple[DictConnection, DictConnection],
) -> None:
    worker, other = worker_and_other
    started = [_start(worker, r) for r in ("r1", "r2", "r3")]
    assert [s.locked for s in started] == [True, True, True]
    assert [(s.row.request_id, s.row.state, s.row.attempts) for s in started if s.row] == [
        ("r1", "sending", 1),
        ("r2", "sending", 1),
        ("r3", "sending", 1),
    ]
    assert all(_locked_elsewhere(other, r) for r in ("r1", "r2", "r3"))

    # Seen before: locked again by the same session (it reads the row next), nothing written.
    again = _start(worker, "r1")
    assert (again.locked, again.row) == (True, None)
    # Another session's copy of a request at work: not locked, nothing written.
    elsewhere = _start(other, "r2")
    assert (elsewhere.locked, elsewhere.row) == (False, None)


def test_a_request_keeps_its_command_only_once_a_retry_will_need_it(
    worker_and_other: tuple[DictConnection, DictConnection],
) -> None:
    """A first attempt has its command in hand; dramatiq's retry has only the key."""
    worker, other = worker_and_other
    for request_id in ("c1", "c2"):
        _start(worker, request_id)
    assert [getattr(repo.get(other, TENANT, r), "command", "?") for r in ("c1", "c2")] == [
        None,
        None,
    ]

    repo.finish(worker, TENANT, "c1", state="retry_wait", command=_command("c1"))
    repo.finish(worker, TENANT, "c2", state="sent", server_id="server-1", smtp_code=250)
    c1, c2 = repo.get(other, TENANT, "c1"), repo.get(other, TENANT, "c2")
    assert c1 is not None and c1.command == _command("c1")
    assert c2 is not None and (c2.state, c2.command) == ("sent", None)

    # A later attempt's outcome keeps the command the row has.
    repo.finish(worker, TENANT, "c1", state="retry_wait", command={"other": True})
    c1 = repo.get(other, TENANT, "c1")
    assert c1 is not None and c1.command == _command("c1")


def test_a_finish_records_the_outcome_and_gives_the_lock_back(
    worker_and_other: tuple[DictConnection, DictConnection],
) -> None:
    worker, other = worker_and_other
    _start(worker, "k0")
    repo.mark_data_started(worker, TENANT, "k0", "server-1", "<m0@x>")
    marked = repo.get(other, TENANT, "k0")
    assert marked is not None and marked.data_started_at is not None
    assert _locked_elsewhere(other, "k0")
    repo.finish(
        worker, TENANT, "k0", state="sent", server_id="server-1", smtp_code=250, unlock=True
    )
    done = repo.get(other, TENANT, "k0")
    assert done is not None and (done.state, done.smtp_code, done.message_id) == (
        "sent",
        250,
        "<m0@x>",
    )
    assert not _locked_elsewhere(other, "k0")


def test_a_request_still_sending_after_its_deadline_is_found(
    worker_and_other: tuple[DictConnection, DictConnection],
) -> None:
    worker, other = worker_and_other
    repo.start(worker, TENANT, "late", -1.0)  # its deadline passed at once
    repo.start(worker, TENANT, "on-time", 60.0)
    stuck = repo.stuck_after_deadline(other)
    assert (TENANT, "late") in stuck and (TENANT, "on-time") not in stuck
