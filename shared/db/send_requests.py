"""SQL for ``send_requests``: the idempotency record of every send command.

The sender's connections are autocommit: every state change below is committed when its
statement returns, because a crash must find it (the state machine:
``docs/design/sender.md``). A request is worked on by one thread at a time, which holds the
request's session advisory lock (released by PostgreSQL when the process dies). Taking the lock
is merged into the statement that records a new request (:func:`start`) and releasing it into
the one that finishes it (:func:`finish`). Because a finish releases the lock before its own
commit, every read made after taking the lock (:func:`lock_and_get`, :func:`get_locked`) uses
``FOR UPDATE``: it waits for that commit and sees the finished row, never the one before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

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
    # None while only the first attempt needed it (that attempt has it in hand): a row keeps
    # the command from the first retry on (:func:`finish` with ``command``).
    command: dict[str, Any] | None
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


def _row(row: dict[str, Any] | None) -> SendRequest | None:
    return SendRequest(**{k: row[k] for k in SendRequest.__dataclass_fields__}) if row else None


def lock_key(tenant_id: str, request_id: str) -> str:
    return f"send\n{tenant_id}\n{request_id}"


@dataclass(frozen=True)
class Started:
    """What :func:`start` found."""

    locked: bool  # else another thread or process works on it right now; nothing was written
    row: SendRequest | None  # the new request (``sending``, attempt 1); None: seen before


def start(
    conn: DictConnection, tenant_id: str, request_id: str, deadline_seconds: float
) -> Started:
    """Lock the request and record it, claimed for its first attempt, in one statement. A
    request seen before stays locked (when ``locked``) and is read with :func:`get_locked`.
    The row keeps no command: the first attempt has it in hand, and a crash brings it again.

    Its commit need not wait for the disk (``synchronous_commit`` off for this statement):
    nothing is handed over before the next, synchronous, commit, which flushes the log up to
    it; a crash of PostgreSQL before that loses only a row whose command was not acked."""
    row = conn.execute(
        f"WITH advisory AS (SELECT pg_try_advisory_lock(hashtextextended(%s, 0)) AS locked,"  # noqa: S608
        f" set_config('synchronous_commit', 'off', true) AS commit_mode),"
        f" inserted AS (INSERT INTO send_requests (tenant_id, request_id, state,"
        f" owner_message_id, attempts, deadline_at)"
        f" SELECT %s, %s, 'sending', %s, 1, now() + make_interval(secs => %s)"
        f" FROM advisory WHERE advisory.locked"
        f" ON CONFLICT (tenant_id, request_id) DO NOTHING RETURNING {_COLUMNS})"
        f" SELECT advisory.locked, inserted.* FROM advisory LEFT JOIN inserted ON true",
        (
            lock_key(tenant_id, request_id),
            tenant_id,
            request_id,
            INTAKE_OWNER,
            deadline_seconds,
        ),
    ).fetchone()
    assert row is not None
    return Started(bool(row["locked"]), _row(row) if row["state"] else None)


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


def mark_data_started(
    conn: DictConnection, tenant_id: str, request_id: str, server_id: str | None, message_id: str
) -> None:
    """The mail is about to be handed over: from this commit on, a crash means "outcome
    unknown" and the request is never sent again."""
    conn.execute(
        "UPDATE send_requests SET data_started_at = now(), server_id = %s, message_id = %s,"
        " updated_at = now() WHERE tenant_id = %s AND request_id = %s",
        (server_id, message_id, tenant_id, request_id),
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
    command: dict[str, Any] | None = None,
    unlock: bool = False,
) -> None:
    """``sent``, ``failed`` (final) or ``retry_wait`` (another attempt follows).

    ``owner_message_id``: the dramatiq message that makes the next attempt; ``command``: kept
    for it, when the row has none yet. ``unlock``: also release the request's lock, in the
    same round trip.
    """
    conn.execute(
        "WITH done AS (UPDATE send_requests SET state = %s, server_id = COALESCE(%s, server_id),"
        " smtp_code = %s, smtp_response = %s, reason = %s, uncertain = %s,"
        " owner_message_id = COALESCE(%s, owner_message_id),"
        " command = COALESCE(command, %s::jsonb), updated_at = now()"
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
            Jsonb(command) if command is not None else None,
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


def retry_due(conn: DictConnection, tenant_id: str, request_id: str, in_seconds: float) -> None:
    """The request's next retry is scheduled to run within ``in_seconds`` (table
    ``send_retries``: what finds a retry that was lost)."""
    conn.execute(
        "INSERT INTO send_retries (tenant_id, request_id, due_at)"
        " VALUES (%s, %s, now() + make_interval(secs => %s))"
        " ON CONFLICT (tenant_id, request_id) DO UPDATE SET due_at = EXCLUDED.due_at",
        (tenant_id, request_id, in_seconds),
    )


def overdue_retries(
    conn: DictConnection, overdue_seconds: float, limit: int = 100
) -> list[tuple[str, str]]:
    """Requests whose retry should have run ``overdue_seconds`` ago, the most overdue first."""
    rows = conn.execute(
        "SELECT tenant_id, request_id FROM send_retries"
        " WHERE due_at < now() - make_interval(secs => %s) ORDER BY due_at LIMIT %s",
        (overdue_seconds, limit),
    ).fetchall()
    return [(row["tenant_id"], row["request_id"]) for row in rows]


def stuck_after_deadline(conn: DictConnection, limit: int = 100) -> list[tuple[str, str]]:
    """Requests still ``sending`` after their deadline: no command or retry moves them on."""
    rows = conn.execute(
        "SELECT tenant_id, request_id FROM send_requests"
        " WHERE deadline_at < now() AND state = 'sending' ORDER BY deadline_at LIMIT %s",
        (limit,),
    ).fetchall()
    return [(row["tenant_id"], row["request_id"]) for row in rows]


def retry_done(conn: DictConnection, tenant_id: str, request_id: str) -> None:
    conn.execute(
        "DELETE FROM send_retries WHERE tenant_id = %s AND request_id = %s",
        (tenant_id, request_id),
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
