"""What the fetcher reads from a mail's header, whatever the mail looks like."""

from __future__ import annotations

import pytest

from services.fetcher.inbound_mail import message_id_of


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
