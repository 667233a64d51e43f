"""Where a connection test saw STARTTLS, credentials never go without TLS again.

An enabled save against the lab's real servers (aiosmtpd for SMTP, Dovecot for IMAP and POP3,
each offering STARTTLS/STLS on its plain port) pins the server's host and port. Then the same
host and port stop offering it: the test's proxy in front of the lab is replaced by a server
that lets anyone log in in plain text and records every byte. The connection test and the
workers' adapters (what the sender and the fetcher log in with) refuse with the reason, and
no login command, let alone the password, reaches the impostor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from psycopg_pool import ConnectionPool

from shared.db import email_servers
from shared.db.pool import DictConnection
from shared.email_servers import EmailServer
from shared.mail.errors import MailServerError
from shared.mail.imap import ImapMailbox
from shared.mail.pop3 import Pop3Mailbox
from shared.mail.smtp import SmtpError, open_session
from tests.lab.certs import LabCertificates
from tests.lab.dovecot import DovecotLab, LabUser
from tests.lab.fixtures import SMTP_LAB_USER
from tests.lab.smtp_server import SmtpLab
from tests.support.api import ApiClient
from tests.support.mail_servers import lab_connector
from tests.support.recording_server import RecordingServer
from tests.support.tcp import TcpProxy


@dataclass(frozen=True)
class Lab:
    """One protocol's real server: where it listens in plain text, and how to log in."""

    protocol: str
    plain_port: int
    username: str
    password: str
    no_longer: str  # the reason's words
    login_commands: tuple[bytes, ...]  # what a client sends to log in


@pytest.fixture(params=["smtp", "imap", "pop3"])
def lab(
    request: pytest.FixtureRequest, smtp_lab: SmtpLab, dovecot: DovecotLab, lab_user: LabUser
) -> Lab:
    if request.param == "smtp":
        secret = smtp_lab.users[SMTP_LAB_USER]
        return Lab(
            "smtp", smtp_lab.port, SMTP_LAB_USER, secret, "no longer offers STARTTLS", (b"AUTH",)
        )
    if request.param == "imap":
        return Lab(
            "imap",
            dovecot.imap_port,
            lab_user.name,
            lab_user.password,
            "no longer offers STARTTLS",
            (b"LOGIN", b"AUTHENTICATE"),
        )
    return Lab(
        "pop3",
        dovecot.pop3_port,
        lab_user.name,
        lab_user.password,
        "no longer offers STLS",
        (b"USER", b"PASS", b"AUTH"),
    )


@pytest.fixture
def front(lab: Lab) -> Iterator[TcpProxy]:
    """A port of the test's own in front of the lab's plain port."""
    proxy = TcpProxy(lab.plain_port)
    proxy.start()
    yield proxy
    proxy.stop()


def stored(pool: ConnectionPool[DictConnection], server_id: str) -> EmailServer:
    with pool.connection() as conn:
        server = email_servers.get(conn, server_id)
    assert server is not None
    return server


def log_in(lab: Lab, server: EmailServer, certs: LabCertificates) -> Callable[[], Any]:
    """How the sender (SMTP) or the fetcher (IMAP, POP3) logs in to ``server``."""
    connector = lab_connector(certs)
    if lab.protocol == "smtp":
        return lambda: open_session(server, lab.password, connector)
    if lab.protocol == "imap":
        return ImapMailbox(server, lab.password, connector).open
    return Pop3Mailbox(server, lab.password, connector).open


def test_a_server_that_stops_offering_starttls_gets_no_credentials(
    api: ApiClient,
    lab: Lab,
    front: TcpProxy,
    pool: ConnectionPool[DictConnection],
    mail_lab_certs: LabCertificates,
) -> None:
    body: dict[str, Any] = {
        "type": lab.protocol,
        "name": f"{lab.protocol} with STARTTLS",
        "host": "localhost",
        "port": front.port,
        "tls": False,
        "username": lab.username,
        "password": lab.password,
        "enabled": True,
    }
    if lab.protocol != "smtp":
        body["routing_plan_id"] = api.routing_plan()
    saved = api.create(**body)
    assert saved["connection"]["ok"] is True
    assert saved["starttls_seen"] is True
    pinned = stored(pool, saved["id"])
    assert pinned.starttls_seen_at == f"localhost:{front.port}" and pinned.requires_tls

    copy = api.post(f"/email-servers/{saved['id']}/duplicate").json()
    assert copy["starttls_seen"] is True  # same place, same pin
    assert stored(pool, copy["id"]).starttls_seen_at == pinned.starttls_seen_at

    front.stop()
    with RecordingServer(lab.protocol, port=front.port) as impostor:
        tested = api.patch(f"/email-servers/{saved['id']}", {"enabled": True})
        assert tested.status_code == 422, tested.text
        assert lab.no_longer in tested.json()["connection"]["reason"]

        with pytest.raises((SmtpError, MailServerError)) as refused:
            log_in(lab, pinned, mail_lab_certs)()
        assert lab.no_longer in refused.value.reason

        assert impostor.connections == 2  # it was asked, and told nothing
        assert not any(command in impostor.received.upper() for command in lab.login_commands)
        assert not impostor.saw(lab.password)


def test_a_server_saved_with_the_tls_box_is_not_pinned(api: ApiClient, smtp_lab: SmtpLab) -> None:
    saved = api.create(
        type="smtp",
        name="implicit TLS",
        host="localhost",
        port=smtp_lab.tls_port,
        tls=True,
        username=SMTP_LAB_USER,
        password=smtp_lab.users[SMTP_LAB_USER],
        enabled=True,
    )
    assert saved["connection"]["ok"] is True
    assert saved["starttls_seen"] is False  # TLS is required by the box already
