"""Which address each fetched mail was sent to, by Message-ID (for replies without From)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.db.pool import DictConnection


@dataclass(frozen=True)
class InboundMessage:
    tenant_id: str
    message_id: str
    server_id: str
    mailbox: str  # the fetching server's user: the address the customer wrote to
    routing_plan_id: str


def normalise_message_id(value: str) -> str:
    """``<abc@example.org>`` and ``abc@example.org`` name the same mail."""
    return value.strip().strip("<>").strip()


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
            [normalise_message_id(m.message_id) for m in messages],
            [m.server_id for m in messages],
            [m.mailbox for m in messages],
            [m.routing_plan_id for m in messages],
        ),
    )


def find(conn: DictConnection, tenant_id: str, message_id: str) -> InboundMessage | None:
    row = conn.execute(
        "SELECT tenant_id, message_id, server_id::text AS server_id, mailbox, routing_plan_id"
        " FROM inbound_messages WHERE tenant_id = %s AND message_id = %s",
        (tenant_id, normalise_message_id(message_id)),
    ).fetchone()
    return InboundMessage(**row) if row else None
