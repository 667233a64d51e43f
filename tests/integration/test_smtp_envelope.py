"""MAIL, RCPT and DATA against the real lab server, pipelined (RFC 2920) where the server offers
PIPELINING and one command at a time where it does not: the same mail, the same refusals, and a
mail is sent to all of its recipients or to none."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from services.sender.connections import SmtpConnections
from shared.contracts.status_reports import FailureCategory
from shared.email_servers import EmailServer
from shared.mail.smtp import SmtpError
from tests.lab.fixtures import SMTP_DEFAULT_USER, SMTP_LAB_USER
from tests.lab.smtp_server import SmtpLab
from tests.support.mail_servers import RecordedHandover, smtp_lab_server


@dataclass(frozen=True)
class Lab:
    server: SmtpLab
    user: str
    pipelining: bool

    @property
    def smtp(self) -> EmailServer:
        return smtp_lab_server(self.server, username=self.user)

    @property
    def password(self) -> str:
        return self.server.users[self.user]


@pytest.fixture(params=[True, False], ids=["pipelined", "one-at-a-time"])
def lab(request: pytest.FixtureRequest, smtp_lab: SmtpLab, smtp_default_lab: SmtpLab) -> Lab:
    """The session's labs: ``smtp_lab`` offers PIPELINING, ``smtp_default_lab`` does not."""
    chosen = (
        Lab(smtp_lab, SMTP_LAB_USER, True)
        if request.param
        else Lab(smtp_default_lab, SMTP_DEFAULT_USER, False)
    )
    chosen.server.clear()
    return chosen


def _mail(recipients: list[str]) -> bytes:
    return (
        f"From: agent@acme.com\r\nTo: {', '.join(recipients)}\r\nSubject: env\r\n\r\nHi.\r\n"
    ).encode()


def _send(
    smtp_connections: SmtpConnections, lab: Lab, recipients: list[str], **kwargs: object
) -> tuple[int, str]:
    return smtp_connections.send(
        lab.smtp,
        lab.password,
        "agent@acme.com",
        recipients,
        _mail(recipients),
        **kwargs,  # type: ignore[arg-type]
    )


def test_envelope_goes_in_one_write_only_to_a_server_that_offers_pipelining(
    smtp_connections: SmtpConnections, lab: Lab
) -> None:
    steps: list[str] = []
    recipients = ["a@example.org", "b@example.org", "c@example.org"]
    code, _ = _send(smtp_connections, lab, recipients, handover=RecordedHandover(steps, ready=True))
    assert code == 250
    assert steps == ["start", "wait", "deciding"]
    [mail] = lab.server.wait_for(1)
    assert (mail.envelope_from, mail.recipients) == ("agent@acme.com", recipients)
    assert mail.raw == _mail(recipients)
    assert mail.pipelined is lab.pipelining
    _send(smtp_connections, lab, ["next@example.org"])  # the connection is in step for the next one
    assert [m.recipients for m in lab.server.wait_for(2)][1] == ["next@example.org"]
    assert smtp_connections.opened == 1


@pytest.mark.parametrize(
    ("reply", "temporary"),
    [("550 5.1.1 no such user", False), ("451 4.3.0 mailbox busy", True)],
    ids=["550", "451"],
)
def test_a_refused_recipient_stops_the_mail_for_every_recipient(
    smtp_connections: SmtpConnections, lab: Lab, reply: str, temporary: bool
) -> None:
    """All or nothing: a retry must never deliver twice to the recipients that were accepted.
    Pipelined, the server has answered DATA with 354 by then: the connection is closed before
    the mail's final dot, which delivers nothing, and the next mail takes a new one."""
    lab.server.script({}, rcpt={"gone@example.org": reply})
    with pytest.raises(SmtpError) as raised:
        _send(smtp_connections, lab, ["ok@example.org", "gone@example.org"])
    error = raised.value
    assert error.temporary is temporary
    assert error.category is FailureCategory.PROTOCOL
    assert (error.code, error.response) == (int(reply[:3]), reply[4:])
    assert "gone@example.org" in error.reason and "ok@example.org" not in error.reason
    code, _ = _send(smtp_connections, lab, ["after@example.org"])
    assert code == 250
    time.sleep(0.3)  # a mail accepted for ok@ would have been stored before the next one
    assert [m.recipients for m in lab.server.mails()] == [["after@example.org"]]
    assert smtp_connections.opened == (2 if lab.pipelining else 1)


def test_a_refused_sender_address_sends_nothing(
    smtp_connections: SmtpConnections, lab: Lab
) -> None:
    lab.server.script({}, mail={"agent@acme.com": "553 5.7.1 sender not allowed"})
    with pytest.raises(SmtpError) as raised:
        _send(smtp_connections, lab, ["a@example.org"])
    assert (raised.value.code, raised.value.temporary) == (553, False)
    assert "sender address" in raised.value.reason
    lab.server.script({})
    assert _send(smtp_connections, lab, ["later@example.org"])[0] == 250
    time.sleep(0.3)
    assert [m.recipients for m in lab.server.mails()] == [["later@example.org"]]


def test_a_record_that_fails_to_start_hands_nothing_over(
    smtp_connections: SmtpConnections, lab: Lab
) -> None:
    """Pipelined, the server has the whole envelope and answers DATA with 354 while the caller
    fails: the connection is dropped before the final dot."""
    with pytest.raises(RuntimeError):
        _send(
            smtp_connections,
            lab,
            ["lost@example.org"],
            handover=RecordedHandover([], fail_at="start"),
        )
    assert _send(smtp_connections, lab, ["next@example.org"])[0] == 250
    time.sleep(0.3)
    assert [m.recipients for m in lab.server.mails()] == [["next@example.org"]]
    assert smtp_connections.opened == 2
