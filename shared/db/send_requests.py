"""SQL for ``send_requests``: the idempotency record of every send command.

The sender's delivery threads use an autocommit connection: every state change below is
committed when the statement returns, because a crash must find it (see the migration 0003
and ``services/sender/delivery.py`` for the state machine).

A request is worked on by one thread at a time, which holds the request's session advisory
lock (released by PostgreSQL when the process dies). To keep a mail to three round trips
(:func:`start_first_attempt`, :func:`begin_mark_data_started`, :func:`finish`), taking the
lock is merged into the first statement and releasing it into the last. Because
:func:`finish` releases the lock before its own commit, every read made after taking the
lock (:func:`lock_and_get`, :func:`get_locked`) uses ``FOR UPDATE``: it waits for that commit
and sees the finished row, never the one before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import generators, pq
from psycopg.types.json import Jsonb

from shared.db.pool import DictConnection

# ``owner_message_id`` of a request whose first attempt the intake makes itself; a dramatiq
# message owns the request only from its first retry on.
INTAKE_OWNER = "intake"


@dataclass(frozen=True)
class SendRequest:
    tenant_id: str
    request_id: str
    state: str
    command: dict[str, Any]
    owner_message_id: str
    attempts: int
    server_id: str | None
    message_id: str | None
    smtp_code: int | None
    smtp_response: str | None
    reason: str | None
    uncertain: bool
    data_started_at: datetime | None
    received_at: datetime
    deadline_at: datetime
    updated_at: datetime


# A constant (no input reaches it); the f-strings below only splice it in.
_COLUMNS = (
    "tenant_id, request_id, state, command, owner_message_id, attempts, server_id, message_id,"
    " smtp_code, smtp_response, reason, uncertain, data_started_at, received_at, deadline_at,"
    " updated_at"
)


# The same without ``command``: a new row's command is the one just inserted, so it need not
# travel back and be parsed again (a 2 KB JSON document per mail, both in PostgreSQL and here).
_COLUMNS_BUT_COMMAND = _COLUMNS.replace(" command,", "")


def _row(row: dict[str, Any] | None) -> SendRequest | None:
    return SendRequest(**{k: row[k] for k in SendRequest.__dataclass_fields__}) if row else None


def lock_key(tenant_id: str, request_id: str) -> str:
    return f"send\n{tenant_id}\n{request_id}"


def start_first_attempt(
    conn: DictConnection,
    tenant_id: str,
    request_id: str,
    command: dict[str, Any],
    deadline_seconds: float,
) -> tuple[bool, SendRequest | None]:
    """Lock the request and record it, already claimed (``sending``, attempt 1): one statement.

    ``(locked?, row)``: ``row`` is the new request, or ``None`` when the request was seen
    before (then read it with :func:`get_locked`). Not ``locked``: another thread or process
    is working on it right now, and nothing was written.
    """
    row = conn.execute(
        # synchronous_commit off for this one statement: its commit need not wait for the
        # disk, because nothing is handed over before the next (synchronous) commit, which
        # flushes the log up to it. A crash of PostgreSQL before that loses only a row whose
        # command was not acked: it is delivered again and recorded again.
        f"WITH advisory AS (SELECT pg_try_advisory_lock(hashtextextended(%s, 0)) AS locked,"  # noqa: S608
        f" set_config('synchronous_commit', 'off', true) AS commit_mode),"
        f" inserted AS (INSERT INTO send_requests (tenant_id, request_id, state, command,"
        f" owner_message_id, attempts, deadline_at)"
        f" SELECT %s, %s, 'sending', %s, %s, 1, now() + make_interval(secs => %s)"
        f" FROM advisory WHERE advisory.locked"
        f" ON CONFLICT (tenant_id, request_id) DO NOTHING RETURNING {_COLUMNS_BUT_COMMAND})"
        f" SELECT advisory.locked, inserted.* FROM advisory LEFT JOIN inserted ON true",
        (
            lock_key(tenant_id, request_id),
            tenant_id,
            request_id,
            Jsonb(command),
            INTAKE_OWNER,
            deadline_seconds,
        ),
    ).fetchone()
    assert row is not None
    if row["state"] is None:
        return bool(row["locked"]), None
    return bool(row["locked"]), _row({**row, "command": command})


def get_locked(conn: DictConnection, tenant_id: str, request_id: str) -> SendRequest | None:
    """The request, read by the thread holding its lock (after the last writer's commit)."""
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM send_requests"  # noqa: S608
        f" WHERE tenant_id = %s AND request_id = %s FOR UPDATE",
        (tenant_id, request_id),
    ).fetchone()
    return _row(row)


def lock_and_get(
    conn: DictConnection, tenant_id: str, request_id: str
) -> tuple[bool, SendRequest | None]:
    """Take the request's session advisory lock (held while one thread works on it)."""
    # The lock first, then the row (FOR UPDATE: after the last writer's commit).
    row = conn.execute(
        f"WITH advisory AS (SELECT pg_try_advisory_lock(hashtextextended(%s, 0)) AS locked)"  # noqa: S608
        f" SELECT advisory.locked, r.* FROM advisory"
        f" LEFT JOIN LATERAL (SELECT {_COLUMNS} FROM send_requests"
        f" WHERE tenant_id = %s AND request_id = %s AND advisory.locked FOR UPDATE) r ON true",
        (lock_key(tenant_id, request_id), tenant_id, request_id),
    ).fetchone()
    assert row is not None
    locked = bool(row["locked"])
    return locked, (_row(row) if locked and row["state"] is not None else None)


def unlock(conn: DictConnection, tenant_id: str, request_id: str) -> None:
    conn.execute(
        "SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (lock_key(tenant_id, request_id),)
    )


def claim(
    conn: DictConnection, tenant_id: str, request_id: str, owner_message_id: str | None = None
) -> SendRequest:
    """Start an attempt: ``sending``, one more attempt, no DATA yet (and a new owner, if given)."""
    row = conn.execute(
        f"UPDATE send_requests SET state = 'sending', attempts = attempts + 1,"  # noqa: S608
        f" data_started_at = NULL, owner_message_id = COALESCE(%s, owner_message_id),"
        f" updated_at = now() WHERE tenant_id = %s AND request_id = %s RETURNING {_COLUMNS}",
        (owner_message_id, tenant_id, request_id),
    ).fetchone()
    claimed = _row(row)
    assert claimed is not None
    return claimed


class PendingStatement:
    """An autocommit statement on its way: sent now, its outcome awaited by :meth:`wait`.

    It uses libpq's asynchronous calls (``Connection.pgconn``), so the caller can talk to
    another server meanwhile. The connection must be idle, and must not be used before
    :meth:`wait` returned.
    """

    def __init__(self, conn: DictConnection, query: str, params: list[str | None]) -> None:
        self._conn = conn
        self._done = False
        encoded = [p.encode() if p is not None else None for p in params]
        conn.pgconn.send_query_params(query.encode(), encoded)
        if conn.pgconn.flush() != 0:  # rarely: the socket took only part of it
            conn.wait(generators.send(conn.pgconn))

    def wait(self) -> None:
        """Until the statement is committed; raises :class:`psycopg.Error` if it failed."""
        if self._done:
            return
        self._done = True
        results = self._conn.wait(generators.fetch_many(self._conn.pgconn))
        for result in results:
            if result.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
                message = (result.error_message or b"").decode(errors="replace").strip()
                raise psycopg.OperationalError(message or f"statement failed ({result.status})")


def begin_mark_data_started(
    conn: DictConnection, tenant_id: str, request_id: str, server_id: str | None, message_id: str
) -> PendingStatement:
    """Record that the mail is about to be handed over; DATA waits for the commit.

    Sent before MAIL FROM and committed while MAIL and RCPT are exchanged: from its commit on,
    a crash means "outcome unknown" (the request is never sent again).
    """
    return PendingStatement(
        conn,
        "UPDATE send_requests SET data_started_at = now(), server_id = $1, message_id = $2,"
        " updated_at = now() WHERE tenant_id = $3 AND request_id = $4",
        [server_id, message_id, tenant_id, request_id],
    )


def finish(
    conn: DictConnection,
    tenant_id: str,
    request_id: str,
    *,
    state: str,
    server_id: str | None = None,
    smtp_code: int | None = None,
    smtp_response: str | None = None,
    reason: str | None = None,
    uncertain: bool = False,
    owner_message_id: str | None = None,
    unlock: bool = False,
) -> None:
    """``sent``, ``failed`` (final) or ``retry_wait`` (another attempt follows).

    ``owner_message_id``: the dramatiq message that makes the next attempt. ``unlock``: also
    release the request's lock, in the same round trip.
    """
    conn.execute(
        "WITH done AS (UPDATE send_requests SET state = %s, server_id = COALESCE(%s, server_id),"
        " smtp_code = %s, smtp_response = %s, reason = %s, uncertain = %s,"
        " owner_message_id = COALESCE(%s, owner_message_id), updated_at = now()"
        " WHERE tenant_id = %s AND request_id = %s RETURNING 1)"
        # The unlock reads ``done`` first: the row is updated (and locked) before it runs.
        " SELECT CASE WHEN %s THEN pg_advisory_unlock(hashtextextended(%s, 0)) END"
        " FROM (SELECT count(*) FROM done) updated",
        (
            state,
            server_id,
            smtp_code,
            smtp_response,
            reason,
            uncertain,
            owner_message_id,
            tenant_id,
            request_id,
            unlock,
            lock_key(tenant_id, request_id),
        ),
    )


def take_over(conn: DictConnection, tenant_id: str, request_id: str, owner_message_id: str) -> None:
    """A new dramatiq message owns the request (older ones become no-ops)."""
    conn.execute(
        "UPDATE send_requests SET owner_message_id = %s, updated_at = now()"
        " WHERE tenant_id = %s AND request_id = %s",
        (owner_message_id, tenant_id, request_id),
    )


def get(conn: DictConnection, tenant_id: str, request_id: str) -> SendRequest | None:
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM send_requests WHERE tenant_id = %s AND request_id = %s",  # noqa: S608
        (tenant_id, request_id),
    ).fetchone()
    return _row(row)


def tenant_known(conn: DictConnection, tenant_id: str) -> bool:
    """A company Mailroom knows: it has a mail server or a routing plan."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM email_servers WHERE tenant_id = %s)"
        " OR EXISTS (SELECT 1 FROM routing_plans WHERE tenant_id = %s) AS known",
        (tenant_id, tenant_id),
    ).fetchone()
    return bool(row and row["known"])
