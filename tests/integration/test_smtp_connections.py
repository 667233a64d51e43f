"""The sender's pooled SMTP connections against the real lab server (aiosmtpd, STARTTLS, AUTH):
a thread keeps its connection from one mail to the next (a turn) without ever holding two."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from services.sender.connections import SmtpConnections, Turn
from shared.email_servers import EmailServer
from tests.lab.fixtures import SMTP_DEFAULT_USER, SMTP_LAB_USER
from tests.lab.smtp_server import SmtpLab
from tests.support.mail_servers import RecordedHandover, smtp_lab_server


def _mail(recipient: str) -> bytes:
    return (f"From: agent@acme.com\r\nTo: {recipient}\r\nSubject: turn\r\n\r\nHello.\r\n").encode()


def _send(
    smtp_connections: SmtpConnections,
    lab: SmtpLab,
    server: EmailServer,
    recipient: str,
    *,
    user: str = SMTP_LAB_USER,
    turn: Turn | None = None,
    waited: list[str] | None = None,
) -> tuple[int, str]:
    return smtp_connections.send(
        server,
        lab.users[user],
        "agent@acme.com",
        [recipient],
        _mail(recipient),
        before_wait=(lambda: waited.append(recipient)) if waited is not None else None,
        turn=turn,
    )


def _in_thread(target: Callable[[], object]) -> tuple[threading.Thread, threading.Event]:
    done = threading.Event()

    def run() -> None:
        target()
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, done


def test_a_turn_keeps_one_connection_for_its_mails_and_another_thread_waits_for_it(
    smtp_connections: SmtpConnections, smtp_lab: SmtpLab
) -> None:
    smtp_lab.clear()
    server = smtp_lab_server(smtp_lab)
    turn = smtp_connections.turn()
    for n in range(3):
        assert (
            _send(smtp_connections, smtp_lab, server, f"turn{n}@example.org", turn=turn)[0] == 250
        )
    waited: list[str] = []
    thread, done = _in_thread(
        lambda: _send(smtp_connections, smtp_lab, server, "other@example.org", waited=waited)
    )
    assert not done.wait(0.5), "the turn holds the server's only connection"
    assert waited == ["other@example.org"]  # it was told before it waited
    turn.release()
    assert done.wait(10)
    thread.join()
    assert smtp_connections.opened == 1  # the same connection, handed over
    arrived = sorted(m.recipients[0] for m in smtp_lab.wait_for(4))
    assert arrived == ["other@example.org"] + [f"turn{n}@example.org" for n in range(3)]


def test_a_turn_gives_a_connection_back_before_it_takes_another_servers(
    smtp_connections: SmtpConnections, smtp_lab: SmtpLab, smtp_default_lab: SmtpLab
) -> None:
    smtp_lab.clear()
    smtp_default_lab.clear()
    first = smtp_lab_server(smtp_lab, id="first")
    second = smtp_lab_server(smtp_default_lab, id="second", username=SMTP_DEFAULT_USER)
    turn = smtp_connections.turn()
    _send(smtp_connections, smtp_lab, first, "a@example.org", turn=turn)
    _send(
        smtp_connections,
        smtp_default_lab,
        second,
        "b@example.org",
        user=SMTP_DEFAULT_USER,
        turn=turn,
    )
    waited: list[str] = []
    # The first server's connection is free again: another thread sends without waiting.
    _send(smtp_connections, smtp_lab, first, "c@example.org", waited=waited)
    assert waited == []
    assert smtp_connections.opened == 2
    turn.release()
    assert sorted(m.recipients[0] for m in smtp_lab.wait_for(2)) == [
        "a@example.org",
        "c@example.org",
    ]
    assert [m.recipients[0] for m in smtp_default_lab.wait_for(1)] == ["b@example.org"]


def test_a_mark_that_cannot_start_stops_the_mail_before_handover_and_drops_the_connection(
    smtp_connections: SmtpConnections, smtp_lab: SmtpLab
) -> None:
    """The handover starts the caller's record while MAIL FROM is answered; if it fails,
    nothing may be handed over, and the connection (mid-transaction) is not used again."""
    smtp_lab.clear()
    server = smtp_lab_server(smtp_lab)
    steps: list[str] = []
    turn = smtp_connections.turn()
    with pytest.raises(RuntimeError):
        smtp_connections.send(
            server,
            smtp_lab.users[SMTP_LAB_USER],
            "agent@acme.com",
            ["lost@example.org"],
            _mail("lost@example.org"),
            handover=RecordedHandover(steps, fail_at="start"),
            turn=turn,
        )
    assert steps == ["start"]
    code, _ = smtp_connections.send(
        server,
        smtp_lab.users[SMTP_LAB_USER],
        "agent@acme.com",
        ["next@example.org"],
        _mail("next@example.org"),
        handover=RecordedHandover(steps),
        turn=turn,
    )
    assert code == 250
    assert steps == ["start", "start", "wait", "deciding"]
    assert smtp_connections.opened == 2  # the broken transaction's connection was closed
    turn.release()
    assert [m.recipients[0] for m in smtp_lab.wait_for(1)] == ["next@example.org"]


@pytest.mark.parametrize("ready", [False, True], ids=["record-late", "record-ready"])
def test_a_sender_that_stops_before_the_final_dot_hands_nothing_over(
    smtp_connections: SmtpConnections, smtp_lab: SmtpLab, ready: bool
) -> None:
    """The mark is awaited only before the mail's final ``.``: MAIL, RCPT, DATA and the mail
    itself went out already. A sender that stops there (its record failed, or it died) hands
    over nothing: the server accepts a mail only at that line. A record that looks committed
    early (the mail and its dot would go in one write) is still confirmed first."""
    smtp_lab.clear()
    server = smtp_lab_server(smtp_lab)
    steps: list[str] = []
    with pytest.raises(RuntimeError):
        smtp_connections.send(
            server,
            smtp_lab.users[SMTP_LAB_USER],
            "agent@acme.com",
            ["half@example.org"],
            _mail("half@example.org"),
            handover=RecordedHandover(steps, fail_at="wait", ready=ready),
        )
    assert steps == ["start", "wait"]
    _send(smtp_connections, smtp_lab, server, "whole@example.org")
    time.sleep(0.5)  # a mail accepted without its final dot would be stored by now
    assert [m.recipients[0] for m in smtp_lab.mails()] == ["whole@example.org"]
