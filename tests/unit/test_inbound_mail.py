"""What the fetcher reads from a mail's header, whatever the mail looks like."""

from __future__ import annotations

import pytest

from services.fetcher.inbound_mail import (
    HEADER_VALUE_CHARS,
    FetchedMail,
    message_id_of,
    to_message,
)
from shared.db.inbound_messages import stored_message_id
from shared.email_servers import AuthType, EmailServer, ServerType


@pytest.mark.parametrize(
    ("raw", "found"),
    [
        (b"Subject: x\r\nMessage-ID: <a@example.org>\r\n\r\nbody", "<a@example.org>"),
        (b"Message-ID:\r\n <folded@example.org>\r\n\r\n", "<folded@example.org>"),
        (b"Subject: none\r\n\r\nMessage-ID: <in-body@example.org>\r\n", None),
        # PostgreSQL's text refuses NUL, and the Message-ID is recorded for replies.
        (b"Message-ID: <nul\x00@example.org>\r\n\r\n", "<nul\ufffd@example.org>"),
        (b"Message-ID: <\xff@example.org>\r\n\r\n", "<\ufffd@example.org>"),
    ],
)
def test_the_message_id_is_found_and_always_storable(raw: bytes, found: str | None) -> None:
    assert message_id_of(raw) == found


def test_a_huge_message_id_is_cut_in_the_amqp_headers_which_fit_one_frame() -> None:
    long_id = "<" + "m" * 200_000 + "@example.org>"
    raw = f"Message-ID: {long_id}\r\n\r\nbody\r\n".encode()
    mail = FetchedMail("uid:1", len(raw), raw, quarantine_reason="r" * 50_000)
    message = to_message(SERVER, mail, "server/1/1")
    headers = message.properties.headers
    assert headers["x-message-id"] == long_id[:997] + "…"
    assert len(headers["x-quarantine-reason"]) == HEADER_VALUE_CHARS
    assert message.body == raw  # the full Message-ID stays in the mail
    frame = b"".join(message.properties.encode())
    assert len(frame) < 128 * 1024 - 8  # RabbitMQ's frame_max, less the frame's own bytes


def test_a_long_message_id_is_stored_and_found_as_its_digest() -> None:
    long_id = "<" + "ä" * 1000 + "@example.org>"
    stored = stored_message_id(long_id)
    assert stored.startswith("sha256:") and len(stored) == 71
    assert stored == stored_message_id(long_id.strip("<>"))  # as a reply's In-Reply-To
    assert stored_message_id("<a@example.org>") == "a@example.org"


SERVER = EmailServer(
    id="00000000-0000-0000-0000-000000000001",
    tenant_id="acme",
    type=ServerType.IMAP,
    name="in",
    host="imap.example.org",
    tls=True,
    auth_type=AuthType.BASIC,
    enabled=True,
    version=1,
    username="support@example.org",
    routing_plan_id="plan",
)
