"""The send_requests statements the delivery threads use, against the real PostgreSQL.

The lock a batch takes in SQL must be the very lock every other reader takes by
:func:`~shared.db.send_requests.lock_key`, and a ``sent`` that rides along with the next
mail's mark must be recorded, and its lock given back, in that one commit.
"""

from __future__ import annotations

import time
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


def _new(request_id: str) -> repo.NewRequest:
    return repo.NewRequest(TENANT, request_id, 60.0)


def _command(request_id: str) -> dict[str, Any]:
    return {"request_id": request_id, "tenant_id": TENANT, "to": ["a@example.org"]}


def _locked_elsewhere(other: DictConnection, request_id: str) -> bool:
    locked, _ = repo.lock_and_get(other, TENANT, request_id)
    if locked:
        repo.unlock(other, TENANT, request_id)
    return not locked


def test_a_batch_records_each_request_claimed_and_holds_the_lock_others_ask_for(
    worker_and_other: tuple[DictConnection, DictConnection],
) -> None:
    worker, other = worker_and_other
    started = repo.start_first_attempts(worker, [_new("r1"), _new("r2"), _new("r3")])
    assert [s.locked for s in started] == [True, True, True]
    assert [(s.row.request_id, s.row.state, s.row.attempts) for s in started if s.row] == [
        ("r1", "sending", 1),
        ("r2", "sending", 1),
        ("r3", "sending", 1),
    ]
    assert all(_locked_elsewhere(other, r) for r in ("r1", "r2", "r3"))

    # Seen before: locked again by the same session (it reads the row next), nothing written.
    again = repo.start_first_attempts(worker, [_new("r1"), _new("r4")])
    assert (again[0].locked, again[0].row) == (True, None)
    assert again[1].row is not None and again[1].row.request_id == "r4"
    # Another session's copy of a request at work: not locked, nothing written.
    elsewhere = repo.start_first_attempts(other, [_new("r2")])
    assert (elsewhere[0].locked, elsewhere[0].row) == (False, None)


def test_a_request_keeps_its_command_only_once_a_retry_will_need_it(
    worker_and_other: tuple[DictConnection, DictConnection],
) -> None:
    """A first attempt has its command in hand; dramatiq's retry has only the key."""
    worker, other = worker_and_other
    repo.start_first_attempts(worker, [_new("c1"), _new("c2")])
    assert [getattr(repo.get(other, TENANT, r), "command", "?") for r in ("c1", "c2")] == [
        None,
        None,
    ]

    repo.finish(worker, TENANT, "c1", state="retry_wait", command=_command("c1"))
    repo.finish_sent(worker, repo.Sent(TENANT, "c2", "server-1", 250, "OK"))
    c1, c2 = repo.get(other, TENANT, "c1"), repo.get(other, TENANT, "c2")
    assert c1 is not None and c1.command == _command("c1")
    assert c2 is not None and (c2.state, c2.command) == ("sent", None)

    # A later attempt's outcome keeps the command the row has.
    repo.finish(worker, TENANT, "c1", state="retry_wait", command={"other": True})
    c1 = repo.get(other, TENANT, "c1")
    assert c1 is not None and c1.command == _command("c1")


def test_a_sent_riding_along_with_the_next_mark_is_recorded_and_unlocked_in_one_commit(
    worker_and_other: tuple[DictConnection, DictConnection],
) -> None:
    worker, other = worker_and_other
    repo.start_first_attempts(worker, [_new("k0"), _new("k1")])
    repo.begin_mark_data_started(worker, TENANT, "k0", "server-1", "<m0@x>").wait()
    previous = repo.Sent(TENANT, "k0", "server-1", 250, "2.0.0 OK")
    repo.begin_mark_data_started(worker, TENANT, "k1", "server-1", "<m1@x>", sent=previous).wait()

    k0, k1 = repo.get(other, TENANT, "k0"), repo.get(other, TENANT, "k1")
    assert k0 is not None and (k0.state, k0.smtp_code, k0.smtp_response) == (
        "sent",
        250,
        "2.0.0 OK",
    )
    assert k1 is not None and (k1.state, k1.message_id) == ("sending", "<m1@x>")
    assert k1.data_started_at is not None
    assert not _locked_elsewhere(other, "k0")
    assert _locked_elsewhere(other, "k1")

    repo.finish_sent(worker, repo.Sent(TENANT, "k1", "server-1", 250, "queued"))
    k1 = repo.get(other, TENANT, "k1")
    assert k1 is not None and (k1.state, k1.smtp_response) == ("sent", "queued")
    assert not _locked_elsewhere(other, "k1")
    leftover = worker.execute(
        "SELECT count(*) AS n FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory'"
    ).fetchone()
    assert leftover is not None and leftover["n"] == 0


def test_a_failed_mark_stays_failed_when_asked_again(
    worker_and_other: tuple[DictConnection, DictConnection],
) -> None:
    """The mail's DATA must never start after its mark failed, however often it asks."""
    worker, _ = worker_and_other
    statement = repo.PendingStatement(worker, "divide", "SELECT 1 / $1::int", ["0"])
    for _ in range(2):
        with pytest.raises(psycopg.Error, match="division by zero"):
            statement.wait()


def test_a_mark_whose_prepared_statement_was_dropped_fails_once_then_prepares_it_again(
    worker_and_other: tuple[DictConnection, DictConnection],
) -> None:
    """Marks are the session's prepared statements. A session that lost them (``DEALLOCATE
    ALL``) fails the next mark, so that mail is not handed over, and heals with the one after."""
    worker, _ = worker_and_other
    first = repo.PendingStatement(worker, "answer", "SELECT $1::int + 1", ["41"])
    deadline = time.monotonic() + 5
    while not first.ready():  # its outcome arrives without anyone waiting for it
        assert time.monotonic() < deadline, "ready() never saw the outcome"
        time.sleep(0.001)
    first.wait()
    worker.execute("DEALLOCATE ALL")
    lost = repo.PendingStatement(worker, "answer", "SELECT $1::int + 1", ["41"])
    with pytest.raises(psycopg.Error, match="does not exist"):
        lost.wait()
    again = repo.PendingStatement(worker, "answer", "SELECT $1::int + 1", ["41"])
    again.wait()
