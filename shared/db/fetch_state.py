"""SQL for the fetcher's durable state: checkpoints, in-flight batches, POP3 UIDLs.

Together with the broker's commit marker (``services/fetcher/handover.py``) these make the
hand-over of a mailbox's mail exactly-once across crashes.

The state belongs to a mailbox, not only to a server's row: an admin may point a server at
another host, user or folder, where UIDs and UIDLs name other mails (a checkpoint of the old
mailbox would skip mail of the new one; an old UIDL would delete a new mail unread). So every
row carries the identity of the mailbox it was written for (:func:`mailbox_identity`), and a
poller reads only the rows of the mailbox it is connected to. Nothing has to be deleted when
the settings change, so there is nothing to race with: a batch of the old mailbox that commits
late writes into the old mailbox's state.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb

from shared.db.pool import DictConnection
from shared.email_servers import DEFAULT_INBOX_FOLDER, EmailServer, ServerType


def mailbox_identity(host: str, username: str, folder: str | None) -> str:
    """Host, user and (IMAP) folder as a digest: a fixed-size key whatever their lengths.

    Migration 0010 computes the same in SQL (``sha256`` of the three joined by line breaks,
    which none of them may contain), for the state written before it.
    """
    text = "\n".join([host, username, folder or ""])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class StateKey:
    """Whose fetch state: the server's row and the mailbox it is connected to."""

    server_id: str
    identity: str

    @classmethod
    def of(cls, server: EmailServer) -> StateKey:
        folder = None
        if server.type is ServerType.IMAP:
            folder = server.inbox_folder or DEFAULT_INBOX_FOLDER
        return cls(server.id, mailbox_identity(server.host, server.username, folder))


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
    identity: str  # the mailbox its mails came from

    @property
    def key(self) -> StateKey:
        return StateKey(self.server_id, self.identity)


def checkpoint(conn: DictConnection, key: StateKey) -> Checkpoint | None:
    row = conn.execute(
        "SELECT folder, uidvalidity, last_uid FROM imap_checkpoints"
        " WHERE server_id = %s AND mailbox_identity = %s",
        (key.server_id, key.identity),
    ).fetchone()
    return Checkpoint(**row) if row else None


def set_checkpoint(conn: DictConnection, key: StateKey, point: Checkpoint) -> None:
    conn.execute(
        "INSERT INTO imap_checkpoints (server_id, mailbox_identity, folder, uidvalidity, last_uid)"
        " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (server_id, mailbox_identity) DO UPDATE SET"
        " folder = EXCLUDED.folder, uidvalidity = EXCLUDED.uidvalidity,"
        " last_uid = EXCLUDED.last_uid, updated_at = now()",
        (key.server_id, key.identity, point.folder, point.uidvalidity, point.last_uid),
    )


def advance_checkpoint(conn: DictConnection, key: StateKey, point: Checkpoint) -> None:
    """Move the checkpoint up to ``point.last_uid``, never down, in one statement: within the
    same folder and UIDVALIDITY the higher UID wins; a new folder or UIDVALIDITY starts over
    at ``point``. (Reading the checkpoint first would cost a round trip per batch.)"""
    conn.execute(
        "INSERT INTO imap_checkpoints AS c"
        " (server_id, mailbox_identity, folder, uidvalidity, last_uid)"
        " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (server_id, mailbox_identity) DO UPDATE SET"
        " last_uid = CASE WHEN (c.folder, c.uidvalidity) = (EXCLUDED.folder, EXCLUDED.uidvalidity)"
        " THEN greatest(c.last_uid, EXCLUDED.last_uid) ELSE EXCLUDED.last_uid END,"
        " folder = EXCLUDED.folder, uidvalidity = EXCLUDED.uidvalidity, updated_at = now()",
        (key.server_id, key.identity, point.folder, point.uidvalidity, point.last_uid),
    )


def open_batch(
    conn: DictConnection,
    key: StateKey,
    folder: str | None,
    uidvalidity: int | None,
    items: list[dict[str, Any]],
) -> Batch:
    batch = Batch(
        str(uuid.uuid4()), key.server_id, folder, uidvalidity, items, "pending", key.identity
    )
    conn.execute(
        "INSERT INTO fetch_batches"
        " (id, server_id, mailbox_identity, folder, uidvalidity, items, state)"
        " VALUES (%s, %s, %s, %s, %s, %s, 'pending')",
        (batch.id, key.server_id, key.identity, folder, uidvalidity, Jsonb(items)),
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
        "SELECT id::text AS id, server_id::text AS server_id, folder, uidvalidity, items, state,"
        " mailbox_identity AS identity FROM fetch_batches WHERE server_id = %s"
        " ORDER BY created_at",
        (server_id,),
    ).fetchall()
    return [Batch(**row) for row in rows]


def delivered_uidls(conn: DictConnection, key: StateKey) -> dict[str, bool]:
    """UIDL -> kept: True for a quarantined mail that stays on the server."""
    rows = conn.execute(
        "SELECT uidl, kept FROM pop3_delivered WHERE server_id = %s AND mailbox_identity = %s",
        (key.server_id, key.identity),
    ).fetchall()
    return {row["uidl"]: row["kept"] for row in rows}


def add_delivered_uidls(
    conn: DictConnection, key: StateKey, uidls: list[str], kept: list[bool]
) -> None:
    conn.execute(
        "INSERT INTO pop3_delivered (server_id, mailbox_identity, uidl, kept)"
        " SELECT %s, %s, u, k FROM unnest(%s::text[], %s::boolean[]) AS t(u, k)"
        " ON CONFLICT DO NOTHING",
        (key.server_id, key.identity, uidls, kept),
    )


def forget_uidls_not_in(conn: DictConnection, key: StateKey, present: list[str]) -> None:
    """UIDLs of mails no longer on the server will never be seen again: drop them. (Those of
    another mailbox the server was pointed at stay, should it be pointed back.)"""
    conn.execute(
        "DELETE FROM pop3_delivered WHERE server_id = %s AND mailbox_identity = %s"
        " AND NOT (uidl = ANY(%s::text[]))",
        (key.server_id, key.identity, present),
    )
