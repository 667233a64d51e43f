"""MAIL, RCPT and DATA against the real lab server, pipelined (RFC 2920) where the server offers
PIPELINING and one command at a time where it does not: the same mail, the same refusals, and a
mail is sent to all of its recipients or to none."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import pytest

from services.sender.connections import SmtpConnections
from shared.contracts.status_reports import FailureCategory
from shared.email_servers import EmailServer
from shared.mail.smtp import PIPELINING_GROUP_BYTES, SmtpError
from tests.lab.fixtures import SMTP_DEFAULT_USER, SMTP_LAB_USER
from tests.lab.smtp_server import SmtpLab
from tests.support.mail_servers import RecordedHandover, smtp_lab_server
from tests.support.tcp import TcpProxy


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
    code, _ = _send(smtp_connections, lab, recipients, handover=RecordedHandover(steps))
    assert code == 250
    assert steps == ["start"]
    [mail] = lab.server.wait_for(1)
    assert (mail.envelope_from, mail.recipients) == ("agent@acme.com", recipients)
    assert mail.raw == _mail(recipients)
    assert mail.pipelined is lab.pipelining
    _send(smtp_connections, lab, ["next@example.org"])  # the connection is in step for the next one
    assert [m.recipients for m in lab.server.wait_for(2)][1] == ["next@example.org"]
    assert smtp_connections.opened == 1


def test_a_mail_to_hundreds_of_recipients_is_pipelined_in_groups_and_arrives_once(
    smtp_connections: SmtpConnections, lab: Lab
) -> None:
    """An envelope larger than ``PIPELINING_GROUP_BYTES`` goes in several groups, each one's
    replies read before the next is written (RFC 2920: no deadlock on full buffers)."""
    recipients = [f"customer-number-{n:03d}@example.org" for n in range(300)]
    assert sum(len(r) for r in recipients) > 2 * PIPELINING_GROUP_BYTES
    data = _mail(["undisclosed-recipients:;"])
    code, _ = smtp_connections.send(lab.smtp, lab.password, "agent@acme.com", recipients, data)
    assert code == 250
    [mail] = lab.server.wait_for(1)
    assert (mail.recipients, mail.raw) == (recipients, data)
    assert mail.pipelined is lab.pipelining
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
    assert smtp_connections.opened == 1  # RSET, and the connection stayed in step


def test_a_mail_whose_every_recipient_is_refused_leaves_the_connection_in_step(
    smtp_connections: SmtpConnections, lab: Lab
) -> None:
    """Pipelined, DATA is refused too (no recipient): a RSET ends it and the connection goes
    on."""
    refusal = "550 5.1.1 no such user"
    lab.server.script({}, rcpt={"x@example.org": refusal, "y@example.org": refusal})
    with pytest.raises(SmtpError) as raised:
        _send(smtp_connections, lab, ["x@example.org", "y@example.org"])
    assert raised.value.code == 550
    assert "x@example.org, y@example.org" in raised.value.reason
    assert _send(smtp_connections, lab, ["z@example.org"])[0] == 250
    assert [m.recipients for m in lab.server.wait_for(1)] == [["z@example.org"]]
    assert smtp_connections.opened == 1


def test_a_refusal_stays_final_when_the_server_hangs_up_after_it(
    smtp_connections: SmtpConnections, lab: Lab
) -> None:
    """Postfix hangs up after too many refusals: the 550 is what is reported (a lost connection
    would be retried for days), and nothing is delivered."""
    lab.server.script(
        {}, rcpt={"gone@example.org": {"reply": "550 5.1.1 no such user", "hang_up": True}}
    )
    with pytest.raises(SmtpError) as raised:
        _send(smtp_connections, lab, ["gone@example.org", "ok@example.org"])
    assert (raised.value.code, raised.value.temporary) == (550, False)
    assert "gone@example.org" in raised.value.reason
    assert _send(smtp_connections, lab, ["after@example.org"])[0] == 250
    time.sleep(0.3)
    assert [m.recipients for m in lab.server.mails()] == [["after@example.org"]]
    assert smtp_connections.opened == 2


def test_a_pooled_connection_the_server_dropped_is_replaced_without_a_failure(
    smtp_connections: SmtpConnections, lab: Lab
) -> None:
    """Servers drop idle sessions. The next mail's first reply finds the connection gone;
    nothing was handed over, so the mail goes out once on a new connection."""
    proxy = TcpProxy(lab.server.port)
    proxy.start()
    try:
        server = smtp_lab_server(lab.server, username=lab.user, port=proxy.port)
        send = partial(smtp_connections.send, server, lab.password, "agent@acme.com")
        assert send(["one@example.org"], _mail(["one@example.org"]))[0] == 250
        proxy.stop()  # both ends of every connection through it are shut
        proxy.start()
        assert send(["two@example.org"], _mail(["two@example.org"]))[0] == 250
    finally:
        proxy.stop()
    assert [m.recipients for m in lab.server.wait_for(2)] == [
        ["one@example.org"],
        ["two@example.org"],
    ]
    assert smtp_connections.opened == 2


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
