"""A request in the hands of one thread, which holds the request's lock (a PostgreSQL
session advisory lock, ``shared.db.send_requests``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import pq

from shared.contracts.send import SendResult
from shared.db import send_requests as repo
from shared.db.pool import DictConnection


@dataclass
class Work:
    """One request in the hands of one thread, which holds the request's lock."""

    conn: DictConnection
    tenant_id: str
    request_id: str
    row: repo.SendRequest | None
    raw: dict[str, Any] | None  # the command as it came (what a dead letter keeps)
    first: bool  # a first attempt: its results go out with its command's ack
    locked: bool = True
    results: list[SendResult] = field(default_factory=list)
    reached_server: bool = False  # the attempt got the server's answer (its strikes clear)

    @property
    def request(self) -> repo.SendRequest:
        assert self.row is not None
        return self.row


def release_locks(conn: DictConnection) -> None:
    """After a failure: every request lock of the session released now, then the connection
    closed (closing alone releases them too, but only once PostgreSQL noticed, while the same
    request may be asked for again at once)."""
    try:
        if not conn.closed and conn.pgconn.transaction_status == pq.TransactionStatus.IDLE:
            conn.execute("SELECT pg_advisory_unlock_all()")
    except psycopg.Error:
        pass  # broken or busy: closing it is all there is
    finally:
        conn.close()
