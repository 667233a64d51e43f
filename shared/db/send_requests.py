"""SQL for ``send_requests``: the idempotency record of every send command.

The sender's delivery threads use an autocommit connection: every state change below is
committed when the statement returns, because a crash must find it (see the migration 0003
and ``services/sender/delivery.py`` for the state machine).

A request is worked on by one thread at a time, which holds the request's session advisory
lock (released by PostgreSQL when the process dies). Taking the lock is merged into the
statement that records the request and releasing it into the one that finishes it. A
delivery thread records a whole batch of new commands in one statement
(:func:`start_first_attempts`), and on the common path a mail then costs one statement
more: :func:`begin_mark_data_started`, which also records the thread's previous mail as
``sent`` (:class:`Sent`), so a mail needs one commit, not two. Because a finish releases the
lock before its own commit, every read made after taking the lock (:func:`lock_and_get`,
:func:`get_locked`) uses ``FOR UPDATE``: it waits for that commit and sees the finished row,
never the one before it.
"""

from __future__ import annotations

import weakref
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
class NewRequest:
    tenant_id: str
    request_id: str
    deadline_seconds: float


@dataclass(frozen=True)
class Started:
    """What :func:`start_first_attempts` found for one request."""

    locked: bool  # else another thread or process works on it right now; nothing was written
    row: SendRequest | None  # the new request (``sending``, attempt 1); None: seen before


def start_first_attempts(conn: DictConnection, requests: list[NewRequest]) -> list[Started]:
    """Lock each request and record it, already claimed: one statement for the whole batch.

    The requests must be distinct. A request seen before stays locked (when ``locked``) and
    is read with :func:`get_locked`. The rows keep no command: the attempt has it in hand,
    and a crash brings it again.
    """
    if not requests:
        return []
    rows = conn.execute(
        # synchronous_commit off for this one statement: its commit need not wait for the
        # disk, because nothing is handed over before the next (synchronous) commit, which
        # flushes the log up to it. A crash of PostgreSQL before that loses only rows whose
        # commands were not acked: they are delivered again and recorded again.
        #
        # The batch travels as one JSON array: psycopg dumps a JSON document in C, whereas
        # text and jsonb arrays are quoted element by element in Python (measured: 7% of the
        # sender's CPU time went to that).
        f"WITH input AS (SELECT r->>'lock_key' AS lock_key, r->>'tenant_id' AS tenant_id,"  # noqa: S608
        f" r->>'request_id' AS request_id,"
        f" (r->>'deadline')::float8 AS deadline, n"
        f" FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS i(r, n)),"
        f" advisory AS (SELECT input.*, pg_try_advisory_lock(hashtextextended(lock_key, 0))"
        f" AS locked, set_config('synchronous_commit', 'off', true) AS commit_mode FROM input),"
        f" inserted AS (INSERT INTO send_requests (tenant_id, request_id, state,"
        f" owner_message_id, attempts, deadline_at)"
        f" SELECT tenant_id, request_id, 'sending', %s, 1,"
        f" now() + make_interval(secs => deadline) FROM advisory WHERE advisory.locked"
        f" ORDER BY n ON CONFLICT (tenant_id, request_id) DO NOTHING"
        f" RETURNING {_COLUMNS})"
        f" SELECT advisory.n, advisory.locked, inserted.* FROM advisory LEFT JOIN inserted"
        f" USING (tenant_id, request_id) ORDER BY advisory.n",
        (
            Jsonb(
                [
                    {
                        "lock_key": lock_key(r.tenant_id, r.request_id),
                        "tenant_id": r.tenant_id,
                        "request_id": r.request_id,
                        "deadline": r.deadline_seconds,
                    }
                    for r in requests
                ]
            ),
            INTAKE_OWNER,
        ),
    ).fetchall()
    assert len(rows) == len(requests)
    return [Started(bool(row["locked"]), _row(row) if row["state"] else None) for row in rows]


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


# The prepared statements each session has (they live as long as it does).
_PREPARED: weakref.WeakKeyDictionary[DictConnection, set[bytes]] = weakref.WeakKeyDictionary()
_NO_SUCH_STATEMENT = b"26000"  # invalid_sql_statement_name


class PendingStatement:
    """An autocommit statement on its way: sent now, its outcome awaited by :meth:`wait`.

    It uses libpq's asynchronous calls (``Connection.pgconn``), so the caller can talk to
    another server meanwhile. The connection must be idle, and must not be used before
    :meth:`wait` returned.

    It runs as the session's prepared statement ``name``, prepared on its first use (one more
    round trip, once per session): parsing and planning the mark with the previous ``sent``
    took half of its 280 µs of PostgreSQL CPU, on the path every mail takes. If the session
    lost it (``DEALLOCATE ALL``; the sender's sessions never prepare statements of psycopg's
    own, whose clean-up would issue one) the statement fails, as any failed statement, before
    anything was handed over, and the next one prepares it again.
    """

    def __init__(
        self, conn: DictConnection, name: str, query: str, params: list[str | None]
    ) -> None:
        self._conn = conn
        self._name = name.encode()
        self._done = False
        self._error: psycopg.Error | None = None
        encoded = [p.encode() if p is not None else None for p in params]
        prepared = _PREPARED.setdefault(conn, set())
        if self._name not in prepared:
            result = conn.pgconn.prepare(self._name, query.encode())
            if result.status != pq.ExecStatus.COMMAND_OK:
                raise psycopg.OperationalError(_message(result))
            prepared.add(self._name)
        conn.pgconn.send_query_prepared(self._name, encoded)
        if conn.pgconn.flush() != 0:  # rarely: the socket took only part of it
            conn.wait(generators.send(conn.pgconn))

    def ready(self) -> bool:
        """Whether its outcome is here (then :meth:`wait` returns at once); never waits.
        libpq's socket is non-blocking: reading what has arrived cannot block."""
        if self._done:
            return True
        try:
            self._conn.pgconn.consume_input()
        except psycopg.Error:
            return True  # broken: :meth:`wait` raises at once
        return not self._conn.pgconn.is_busy()

    def wait(self) -> None:
        """Until the statement is committed; raises :class:`psycopg.Error` if it failed."""
        if self._error is not None:
            raise self._error  # asked again after it failed: still failed
        if self._done:
            return
        self._done = True
        try:
            results = self._conn.wait(generators.fetch_many(self._conn.pgconn))
        except psycopg.Error as exc:
            self._error = exc
            raise
        for result in results:
            if result.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
                if result.error_field(pq.DiagnosticField.SQLSTATE) == _NO_SUCH_STATEMENT:
                    _PREPARED.get(self._conn, set()).discard(self._name)
                self._error = psycopg.OperationalError(_message(result))
                raise self._error


def _message(result: pq.abc.PGresult) -> str:
    message = (result.error_message or b"").decode(errors="replace").strip()
    return message or f"statement failed ({result.status})"


@dataclass(frozen=True)
class Sent:
    """A mail the server accepted, not recorded yet: it rides along with the next statement
    of the same thread (:func:`begin_mark_data_started`), or goes alone (:func:`finish_sent`).
    Its request's lock is held on the same connection until then."""

    tenant_id: str
    request_id: str
    server_id: str | None
    smtp_code: int
    smtp_response: str


def _mark_data_started(first: int) -> str:
    """The mark, with its four parameters numbered from ``$first`` on."""
    server, message, tenant, request = (f"${n}" for n in range(first, first + 4))
    return (
        f"UPDATE send_requests SET data_started_at = now(), server_id = {server},"  # noqa: S608
        f" message_id = {message}, updated_at = now()"
        f" WHERE tenant_id = {tenant} AND request_id = {request}"
    )


def begin_mark_data_started(
    conn: DictConnection,
    tenant_id: str,
    request_id: str,
    server_id: str | None,
    message_id: str,
    sent: Sent | None = None,
) -> PendingStatement:
    """Record that the mail is about to be handed over; its final ``.`` waits for the commit.

    Sent once MAIL FROM is written and committed while MAIL, RCPT and DATA are exchanged:
    from its commit on, a crash means "outcome unknown" (the request is never sent again).
    ``sent``: the same thread's previous mail, recorded (and unlocked) in the same statement
    and commit.
    """
    params: list[str | None] = [server_id, message_id, tenant_id, request_id]
    if sent is None:
        return PendingStatement(conn, "mailroom_mark", _mark_data_started(1), params)
    # ``sent`` as :func:`finish` records it; the unlock reads ``done`` first, so the row is
    # updated (and locked) before the lock goes.
    return PendingStatement(
        conn,
        "mailroom_sent_and_mark",
        "WITH done AS (UPDATE send_requests SET state = 'sent',"  # noqa: S608 - placeholders only
        " server_id = COALESCE($1, server_id), smtp_code = $2, smtp_response = $3,"
        " reason = NULL, uncertain = false, updated_at = now()"
        " WHERE tenant_id = $4 AND request_id = $5 RETURNING 1),"
        " unlocked AS (SELECT pg_advisory_unlock(hashtextextended($6, 0))"
        " FROM (SELECT count(*) FROM done) d),"
        f" marked AS ({_mark_data_started(7)} RETURNING 1)"
        " SELECT (SELECT count(*) FROM unlocked), (SELECT count(*) FROM marked)",
        [
            sent.server_id,
            str(sent.smtp_code),
            sent.smtp_response,
            sent.tenant_id,
            sent.request_id,
            lock_key(sent.tenant_id, sent.request_id),
            *params,
        ],
    )


def finish_sent(conn: DictConnection, sent: Sent, *, unlock: bool = True) -> None:
    """Record ``sent`` on its own (nothing to ride along with)."""
    finish(
        conn,
        sent.tenant_id,
        sent.request_id,
        state="sent",
        server_id=sent.server_id,
        smtp_code=sent.smtp_code,
        smtp_response=sent.smtp_response,
        unlock=unlock,
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
