"""One fetched mail as an AMQP message (CONTRACT.md, "Inbound mail").

The body is the raw RFC 5322 message exactly as the server returned it; Mailroom never parses
or re-encodes it, so broken MIME, 8-bit headers or a missing Message-ID cannot stop a mailbox.
Only the header block is scanned, for the Message-ID. A mail above the size limit goes to the
quarantine queue as its header block plus the reason, and stays on the mail server.

The AMQP headers of a message must fit one frame (RabbitMQ's ``frame_max``, 128 KiB), or the
publish fails and the mailbox with it. So a header value taken from the mail or a server
(``x-message-id``, ``x-quarantine-reason``) is cut at :data:`HEADER_VALUE_CHARS` characters,
ending in "…"; the mail's full Message-ID is in its body.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from functools import cached_property

import pika

from services.fetcher.publisher import OutgoingMail
from shared.email_servers import EmailServer

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_MESSAGE_ID = re.compile(
    rb"^message-id:[ \t]*((?:.*)(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE
)
_HEADER_SCAN_LIMIT = 256 * 1024
HEADER_VALUE_CHARS = 998  # RFC 5322's longest line


@dataclass(frozen=True)
class FetchedMail:
    """A mail taken from a mailbox: ``key`` names it there (``uid:17``, ``uidl:abc``)."""

    key: str
    size: int
    raw: bytes  # the whole mail, or only its header block when quarantined
    quarantine_reason: str | None = None

    @cached_property
    def message_id(self) -> str | None:
        """Scanned for once: the pending batch records it and the AMQP message carries it."""
        return message_id_of(self.raw)


def header_block(raw: bytes) -> bytes:
    head = raw[:_HEADER_SCAN_LIMIT]
    end = _HEADER_END.search(head)
    return head[: end.start()] if end else head


def message_id_of(raw: bytes) -> str | None:
    """The Message-ID header's value, or None; never raises, whatever the mail looks like."""
    match = _MESSAGE_ID.search(header_block(raw))
    if match is None:
        return None
    value = re.sub(rb"\r?\n[ \t]+", b" ", match.group(1)).strip()
    # PostgreSQL stores no NUL (it is recorded for replies): as U+FFFD, as Dovecot writes 0x80.
    text = value.decode("utf-8", "replace").replace("\x00", "\ufffd")
    return text or None


def cut(value: str) -> str:
    """``value`` as an AMQP header value: at most :data:`HEADER_VALUE_CHARS` characters."""
    if len(value) <= HEADER_VALUE_CHARS:
        return value
    return value[: HEADER_VALUE_CHARS - 1] + "…"


def to_message(server: EmailServer, mail: FetchedMail, message_id: str) -> OutgoingMail:
    """The AMQP message for ``mail``; ``message_id`` is stable for this mail on this server."""
    headers: dict[str, object] = {
        "x-tenant-id": server.tenant_id,
        "x-email-server-id": server.id,
        "x-routing-plan-id": server.routing_plan_id,
        "x-mailbox": server.username,
        "x-server-type": server.type.value,
        "x-size": mail.size,
    }
    if (found := mail.message_id) is not None:
        headers["x-message-id"] = cut(found)
    if mail.quarantine_reason is not None:
        headers["x-quarantine-reason"] = cut(mail.quarantine_reason)
    properties = pika.BasicProperties(
        content_type="message/rfc822",
        delivery_mode=2,
        message_id=message_id,
        timestamp=int(time.time()),
        app_id="mailroom-fetcher",
        headers=headers,
    )
    return OutgoingMail(
        routing_key=server.routing_plan_id or "",
        body=mail.raw,
        properties=properties,
        quarantine=mail.quarantine_reason is not None,
    )
