"""SQL for ``send_requests``: the idempotency record of every send command.

The sender's delivery threads use an autocommit connection: every state change below is
committed when the statement returns, because a crash must find it (see the migration 0003
and ``services/sender/delivery.py`` for the state machine).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb

from shared.db.pool import DictConnection

OPEN_STATES = ("received", "sending", "retry_wait")


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


def _row(row: dict[str, Any] | None) -> SendRequest | None:
    return SendRequest(**{k: row[k] for k in SendRequest.__dataclass_fields__}) if row else None


def lock_key(tenant_id: str, request_id: str) -> str:
    return f"send\n{tenant_id}\n{request_id}"


def record_received(
    conn: DictConnection,
    tenant_id: str,
    request_id: str,
    command: dict[str, Any],
    owner_message_id: str,
    deadline_seconds: float,
) -> tuple[bool, str]:
    """Record a command before its AMQP ack; ``(enqueue?, state)``.

    A new request is inserted and owned by ``owner_message_id``. A request seen before is
    handed to the new message only while nobody started on it (``received``): that heals a
    crash between the insert and the enqueue, and makes the older message a no-op.
    """
    row = conn.execute(
        "INSERT INTO send_requests (tenant_id, request_id, state, command, owner_message_id,"
        " deadline_at) VALUES (%s, %s, 'received', %s, %s, now() + make_interval(secs => %s))"
        " ON CONFLICT (tenant_id, request_id) DO NOTHING RETURNING state",
        (tenant_id, request_id, Jsonb(command), owner_message_id, deadline_seconds),
    ).fetchone()
    if row:
        return True, "received"
    row = conn.execute(
        "UPDATE send_requests SET owner_message_id = %s, updated_at = now()"
        " WHERE tenant_id = %s AND request_id = %s AND state = 'received' RETURNING state",
        (owner_message_id, tenant_id, request_id),
    ).fetchone()
    if row:
        return True, "received"
    current = conn.execute(
        "SELECT state FROM send_requests WHERE tenant_id = %s AND request_id = %s",
        (tenant_id, request_id),
    ).fetchone()
    return False, str(current["state"]) if current else "unknown"


def lock_and_get(
    conn: DictConnection, tenant_id: str, request_id: str
) -> tuple[bool, SendRequest | None]:
    """Take the request's session advisory lock (held while one thread works on it)."""
    row = conn.execute(
        f"SELECT pg_try_advisory_lock(hashtextextended(%s, 0)) AS locked, r.*"  # noqa: S608
        f" FROM (SELECT 1) one"
        f" LEFT JOIN (SELECT {_COLUMNS} FROM send_requests"
        f" WHERE tenant_id = %s AND request_id = %s) r ON true",
        (lock_key(tenant_id, request_id), tenant_id, request_id),
    ).fetchone()
    assert row is not None
    locked = bool(row["locked"])
    return locked, (_row(row) if locked and row["state"] is not None else None)


def unlock(conn: DictConnection, tenant_id: str, request_id: str) -> None:
    conn.execute(
        "SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (lock_key(tenant_id, request_id),)
    )


def claim(conn: DictConnection, tenant_id: str, request_id: str) -> SendRequest:
    """Start an attempt: ``sending``, one more attempt, no DATA yet."""
    row = conn.execute(
        f"UPDATE send_requests SET state = 'sending', attempts = attempts + 1,"  # noqa: S608
        f" data_started_at = NULL, updated_at = now()"
        f" WHERE tenant_id = %s AND request_id = %s RETURNING {_COLUMNS}",
        (tenant_id, request_id),
    ).fetchone()
    claimed = _row(row)
    assert claimed is not None
    return claimed


def mark_data_started(
    conn: DictConnection, tenant_id: str, request_id: str, server_id: str | None, message_id: str
) -> None:
    """Committed just before DATA: from here on, a crash means "outcome unknown"."""
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
) -> None:
    """``sent``, ``failed`` (final) or ``retry_wait`` (another attempt follows)."""
    conn.execute(
        "UPDATE send_requests SET state = %s, server_id = COALESCE(%s, server_id),"
        " smtp_code = %s, smtp_response = %s, reason = %s, uncertain = %s, updated_at = now()"
        " WHERE tenant_id = %s AND request_id = %s",
        (
            state,
            server_id,
            smtp_code,
            smtp_response,
            reason,
            uncertain,
            tenant_id,
            request_id,
        ),
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
