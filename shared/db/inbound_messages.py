"""Which address each fetched mail was sent to, by Message-ID (for replies without From).

A Message-ID is whatever the mail's author wrote, of any length; a PostgreSQL index entry
holds at most about 2.7 KB. A Message-ID longer than :data:`STORED_MESSAGE_ID_BYTES` is
therefore stored, and looked up, as its digest (:func:`stored_message_id`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from shared.db.pool import DictConnection


@dataclass(frozen=True)
class InboundMessage:
    tenant_id: str
    message_id: str
    server_id: str
    mailbox: str  # the fetching server's user: the address the customer wrote to
    routing_plan_id: str


STORED_MESSAGE_ID_BYTES = 1000


def normalise_message_id(value: str) -> str:
    """``<abc@example.org>`` and ``abc@example.org`` name the same mail."""
    return value.strip().strip("<>").strip()


def stored_message_id(value: str) -> str:
    """The key a Message-ID is stored and found under: normalised, and a long one hashed."""
    normal = normalise_message_id(value)
    encoded = normal.encode("utf-8", "surrogatepass")
    if len(encoded) <= STORED_MESSAGE_ID_BYTES:
        return normal
    return "sha256:" + hashlib.sha256(encoded).hexdigest()


def record(conn: DictConnection, messages: list[InboundMessage]) -> None:
    """Remember many at once: one statement, not one round trip per mail."""
    if not messages:
        return
    conn.execute(
        "INSERT INTO inbound_messages (tenant_id, message_id, server_id, mailbox, routing_plan_id)"
        " SELECT * FROM unnest(%s::text[], %s::text[], %s::uuid[], %s::text[], %s::text[])"
        " ON CONFLICT (tenant_id, message_id) DO NOTHING",
        (
            [m.tenant_id for m in messages],
            [stored_message_id(m.message_id) for m in messages],
            [m.server_id for m in messages],
            [m.mailbox for m in messages],
            [m.routing_plan_id for m in messages],
        ),
    )


def find(conn: DictConnection, tenant_id: str, message_id: str) -> InboundMessage | None:
    row = conn.execute(
        "SELECT tenant_id, message_id, server_id::text AS server_id, mailbox, routing_plan_id"
        " FROM inbound_messages WHERE tenant_id = %s AND message_id = %s",
        (tenant_id, stored_message_id(message_id)),
    ).fetchone()
    return InboundMessage(**row) if row else None
