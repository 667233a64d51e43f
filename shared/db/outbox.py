"""The transactional outbox: events are rows written in the transaction of the change.

A change that rolls back leaves no event; a committed change always has one, which the relay
(``services/config_api/outbox_relay.py``) publishes once RabbitMQ takes it. ``NOTIFY`` is
delivered by PostgreSQL only on commit, so the relay wakes up within milliseconds of a commit
without polling fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb
from pydantic import BaseModel

from shared.db.pool import DictConnection

NOTIFY_CHANNEL = "mailroom_outbox"


@dataclass(frozen=True)
class OutboxEntry:
    id: int
    routing_key: str
    body: dict[str, Any]
    created_at: datetime


def enqueue(conn: DictConnection, routing_key: str, event: BaseModel) -> None:
    conn.execute(
        "INSERT INTO outbox (routing_key, body) VALUES (%s, %s)",
        (routing_key, Jsonb(event.model_dump(mode="json"))),
    )
    conn.execute(f"NOTIFY {NOTIFY_CHANNEL}")


def pending(conn: DictConnection, limit: int = 100) -> list[OutboxEntry]:
    rows = conn.execute(
        "SELECT id, routing_key, body, created_at FROM outbox"
        " WHERE published_at IS NULL ORDER BY id LIMIT %s",
        (limit,),
    ).fetchall()
    return [OutboxEntry(**row) for row in rows]


def mark_published(conn: DictConnection, ids: list[int]) -> None:
    conn.execute("UPDATE outbox SET published_at = now() WHERE id = ANY(%s)", (ids,))


def purge_published(conn: DictConnection, older_than_hours: int = 24) -> int:
    cursor = conn.execute(
        "DELETE FROM outbox WHERE published_at < now() - make_interval(hours => %s)",
        (older_than_hours,),
    )
    return cursor.rowcount
