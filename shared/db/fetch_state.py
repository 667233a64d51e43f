"""SQL for the fetcher's durable state: checkpoints, in-flight batches, POP3 UIDLs.

Together with the broker's commit marker (``services/fetcher/handover.py``) these make the
hand-over of a mailbox's mail exactly-once across crashes.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb

from shared.db.pool import DictConnection


@dataclass(frozen=True)
class Checkpoint:
    folder: str
    uidvalidity: int
    last_uid: int


@dataclass(frozen=True)
class Batch:
    id: str
    server_id: str
    folder: str | None
    uidvalidity: int | None
    items: list[dict[str, Any]]
    state: str


def checkpoint(conn: DictConnection, server_id: str) -> Checkpoint | None:
    row = conn.execute(
        "SELECT folder, uidvalidity, last_uid FROM imap_checkpoints WHERE server_id = %s",
        (server_id,),
    ).fetchone()
    return Checkpoint(**row) if row else None


def set_checkpoint(conn: DictConnection, server_id: str, point: Checkpoint) -> None:
    conn.execute(
        "INSERT INTO imap_checkpoints (server_id, folder, uidvalidity, last_uid)"
        " VALUES (%s, %s, %s, %s) ON CONFLICT (server_id) DO UPDATE SET"
        " folder = EXCLUDED.folder, uidvalidity = EXCLUDED.uidvalidity,"
        " last_uid = EXCLUDED.last_uid, updated_at = now()",
        (server_id, point.folder, point.uidvalidity, point.last_uid),
    )


def advance_checkpoint(conn: DictConnection, server_id: str, point: Checkpoint) -> None:
    """Move the checkpoint up to ``point.last_uid``, never down, in one statement: within the
    same folder and UIDVALIDITY the higher UID wins; a new folder or UIDVALIDITY starts over
    at ``point``. (Reading the checkpoint first would cost a round trip per batch.)"""
    conn.execute(
        "INSERT INTO imap_checkpoints AS c (server_id, folder, uidvalidity, last_uid)"
        " VALUES (%s, %s, %s, %s) ON CONFLICT (server_id) DO UPDATE SET"
        " last_uid = CASE WHEN (c.folder, c.uidvalidity) = (EXCLUDED.folder, EXCLUDED.uidvalidity)"
        " THEN greatest(c.last_uid, EXCLUDED.last_uid) ELSE EXCLUDED.last_uid END,"
        " folder = EXCLUDED.folder, uidvalidity = EXCLUDED.uidvalidity, updated_at = now()",
        (server_id, point.folder, point.uidvalidity, point.last_uid),
    )


def open_batch(
    conn: DictConnection,
    server_id: str,
    folder: str | None,
    uidvalidity: int | None,
    items: list[dict[str, Any]],
) -> Batch:
    batch = Batch(str(uuid.uuid4()), server_id, folder, uidvalidity, items, "pending")
    conn.execute(
        "INSERT INTO fetch_batches (id, server_id, folder, uidvalidity, items, state)"
        " VALUES (%s, %s, %s, %s, %s, 'pending')",
        (batch.id, server_id, folder, uidvalidity, Jsonb(items)),
    )
    return batch


def without_waiting_for_disk(conn: DictConnection) -> None:
    """This transaction's commit need not wait for the disk (``synchronous_commit = off``).

    For steps whose loss after a crash the hand-over repairs by itself: a lost "committed"
    leaves the batch pending, and the broker's marker then commits it again; a lost "closed"
    only repeats the flagging. The pending record itself is always written durably.
    """
    conn.execute("SET LOCAL synchronous_commit TO OFF")


def mark_committed(conn: DictConnection, batch_id: str) -> None:
    conn.execute("UPDATE fetch_batches SET state = 'committed' WHERE id = %s", (batch_id,))


def close_batch(conn: DictConnection, batch_id: str) -> None:
    conn.execute("DELETE FROM fetch_batches WHERE id = %s", (batch_id,))


def open_batches(conn: DictConnection, server_id: str) -> list[Batch]:
    rows = conn.execute(
        "SELECT id::text AS id, server_id::text AS server_id, folder, uidvalidity, items, state"
        " FROM fetch_batches WHERE server_id = %s ORDER BY created_at",
        (server_id,),
    ).fetchall()
    return [Batch(**row) for row in rows]


def delivered_uidls(conn: DictConnection, server_id: str) -> dict[str, bool]:
    """UIDL -> kept: True for a quarantined mail that stays on the server."""
    rows = conn.execute(
        "SELECT uidl, kept FROM pop3_delivered WHERE server_id = %s", (server_id,)
    ).fetchall()
    return {row["uidl"]: row["kept"] for row in rows}


def add_delivered_uidls(
    conn: DictConnection, server_id: str, uidls: list[str], kept: list[bool]
) -> None:
    conn.execute(
        "INSERT INTO pop3_delivered (server_id, uidl, kept)"
        " SELECT %s, u, k FROM unnest(%s::text[], %s::boolean[]) AS t(u, k)"
        " ON CONFLICT DO NOTHING",
        (server_id, uidls, kept),
    )


def forget_uidls_not_in(conn: DictConnection, server_id: str, present: list[str]) -> None:
    """UIDLs of mails no longer on the server will never be seen again: drop them."""
    conn.execute(
        "DELETE FROM pop3_delivered WHERE server_id = %s AND NOT (uidl = ANY(%s::text[]))",
        (server_id, present),
    )
