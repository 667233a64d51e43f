"""The sender's pooled SMTP connections against the real lab server (aiosmtpd, STARTTLS, AUTH):
reused, bounded in what a send waits for, replaced at once when the server closes them."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest

from services.sender.connections import SmtpConnections
from shared.email_servers import EmailServer
from shared.mail.connector import Connector
from shared.mail.smtp import SmtpError
from shared.settings import Settings
from tests.lab.certs import LabCertificates
from tests.lab.fixtures import SMTP_LAB_USER
from tests.lab.smtp_server import SmtpLab
from tests.support.mail_servers import RecordedHandover, smtp_lab_server


def _mail(recipient: str) -> bytes:
    return (f"From: agent@acme.com\r\nTo: {recipient}\r\nSubject: pool\r\n\r\nHello.\r\n").encode()


def _send(
    connections: SmtpConnections, lab: SmtpLab, server: EmailServer, recipient: str
) -> tuple[int, str]:
    return connections.send(
        server, lab.users[SMTP_LAB_USER], "agent@acme.com", [recipient], _mail(recipient)
    )


def test_a_connection_is_reused_for_the_next_mail(
    smtp_connections: SmtpConnections, smtp_lab: SmtpLab
) -> None:
    smtp_lab.clear()
    server = smtp_lab_server(smtp_lab)
    for n in range(3):
        assert _send(smtp_connections, smtp_lab, server, f"n{n}@example.org")[0] == 250
    assert smtp_connections.opened == 1
    assert len(smtp_lab.wait_for(3)) == 3


def test_a_send_waits_for_a_busy_servers_connection_only_a_bounded_time(
    smtp_lab: SmtpLab, mail_lab_certs: LabCertificates
) -> None:
    """The server's one connection is held by a slow transaction: another send gives up after
    the slot wait, as a temporary failure (retried later), instead of waiting behind it."""
    smtp_lab.clear()
    smtp_lab.script({"slow@example.org": ["250 slow"]})
    connector = replace(Connector.from_settings(Settings(), 10), ca_bundle=mail_lab_certs.ca)
    connections = SmtpConnections(
        per_server=1, idle_seconds=60, connector=connector, slot_wait_seconds=0.3
    )
    server = smtp_lab_server(smtp_lab)
    holding = threading.Event()

    class Slow(RecordedHandover):
        def start(self) -> None:
            holding.set()
            time.sleep(1.5)  # the transaction holds the connection meanwhile

    try:
        slow = threading.Thread(
            target=lambda: connections.send(
                server,
                smtp_lab.users[SMTP_LAB_USER],
                "agent@acme.com",
                ["slow@example.org"],
                _mail("slow@example.org"),
                handover=Slow([]),
            )
        )
        slow.start()
        assert holding.wait(10)
        started = time.monotonic()
        with pytest.raises(SmtpError) as busy:
            _send(connections, smtp_lab, server, "other@example.org")
        assert time.monotonic() - started < 1.0
        assert busy.value.temporary and "busy" in busy.value.reason
        slow.join(10)
    finally:
        connections.close()


def test_a_mark_that_cannot_start_stops_the_mail_before_handover_and_drops_the_connection(
    smtp_connections: SmtpConnections, smtp_lab: SmtpLab
) -> None:
    """The handover records the caller's intent while MAIL FROM is answered; if it fails,
    nothing may be handed over, and the connection (mid-transaction) is not used again."""
    smtp_lab.clear()
    server = smtp_lab_server(smtp_lab)
    steps: list[str] = []
    with pytest.raises(RuntimeError):
        smtp_connections.send(
            server,
            smtp_lab.users[SMTP_LAB_USER],
            "agent@acme.com",
            ["lost@example.org"],
            _mail("lost@example.org"),
            handover=RecordedHandover(steps, fail_at="start"),
        )
    code, _ = smtp_connections.send(
        server,
        smtp_lab.users[SMTP_LAB_USER],
        "agent@acme.com",
        ["next@example.org"],
        _mail("next@example.org"),
        handover=RecordedHandover(steps),
    )
    assert code == 250
    assert steps == ["start", "start"]
    assert smtp_connections.opened == 2  # the broken transaction's connection was closed
    time.sleep(0.5)  # a mail accepted without its final dot would be stored by now
    assert [m.recipients[0] for m in smtp_lab.mails()] == ["next@example.org"]


def test_a_421_on_a_reused_connection_means_reconnect_now(
    smtp_connections: SmtpConnections, smtp_lab: SmtpLab
) -> None:
    """Postfix says 421 when it closes an idle session: the mail goes on a new connection at
    once, not after a retry's backoff."""
    smtp_lab.clear()
    server = smtp_lab_server(smtp_lab)
    assert _send(smtp_connections, smtp_lab, server, "first@example.org")[0] == 250
    smtp_lab.script({}, mail={"agent@acme.com": {"reply": "421 4.4.2 closing", "hang_up": True}})
    with pytest.raises(SmtpError) as closing:  # the new connection is closed too, here
        _send(smtp_connections, smtp_lab, server, "second@example.org")
    assert closing.value.temporary and not closing.value.handed_over
    assert smtp_connections.opened == 2  # replaced at once
    smtp_lab.script({})
    assert _send(smtp_connections, smtp_lab, server, "third@example.org")[0] == 250
