"""The connection probe against real mail servers: every reason an admin may read.

Dovecot (IMAP, POP3) and aiosmtpd (SMTP) of the mail lab, on loopback, with the lab's CA.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from shared.email_servers import AuthType, ServerType
from shared.probe import NO_ROUTING_PLAN, ConnectionProbe
from tests.lab.certs import LabCertificates
from tests.lab.dovecot import NON_ASCII_FOLDER, DovecotLab, LabUser
from tests.lab.fixtures import SMTP_LAB_USER
from tests.lab.smtp_server import SmtpLab
from tests.support.mail_servers import lab_connector, lab_server, smtp_lab_server
from tests.support.tcp import closed_port, listening_port


@pytest.fixture
def probe(mail_lab_certs: LabCertificates) -> ConnectionProbe:
    return ConnectionProbe(lab_connector(mail_lab_certs, timeout=2.0))


# --- IMAP ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "starttls"])
def test_imap_ok_with_capabilities(
    probe: ConnectionProbe, dovecot: DovecotLab, lab_user: LabUser, tls: bool
) -> None:
    result = probe(lab_server(dovecot, lab_user, tls=tls), lab_user.password)
    assert result.ok and result.reason is None and result.category is None
    assert {"IDLE", "COMPRESS=DEFLATE", "AUTH=PLAIN"} <= set(result.capabilities)
    assert ("STARTTLS" in result.capabilities) is not tls


def test_imap_non_ascii_folder_is_selected(
    probe: ConnectionProbe, dovecot: DovecotLab, lab_user: LabUser
) -> None:
    server = lab_server(dovecot, lab_user, inbox_folder=NON_ASCII_FOLDER)
    assert probe(server, lab_user.password).ok


def test_imap_missing_folder(
    probe: ConnectionProbe, dovecot: DovecotLab, lab_user: LabUser
) -> None:
    server = lab_server(dovecot, lab_user, inbox_folder="Ausgang Ü")
    result = probe(server, lab_user.password)
    assert not result.ok
    assert result.reason == "folder 'Ausgang Ü' does not exist"
    assert result.category == "folder_missing"


def test_imap_wrong_password(
    probe: ConnectionProbe, dovecot: DovecotLab, lab_user: LabUser
) -> None:
    result = probe(lab_server(dovecot, lab_user), "not-the-password")
    assert not result.ok and result.category == "authentication"
    assert result.reason is not None
    assert result.reason.startswith("authentication failed: server said")
    assert "not-the-password" not in result.reason


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "starttls"])
def test_certificate_for_another_name(
    probe: ConnectionProbe,
    dovecot: DovecotLab,
    lab_user: LabUser,
    mail_lab_certs: LabCertificates,
    tls: bool,
) -> None:
    server = lab_server(dovecot, lab_user, tls=tls, sni_hostname=mail_lab_certs.mismatch_name)
    result = probe(server, lab_user.password)
    assert not result.ok and result.category == "certificate"
    port = server.effective_port
    assert result.reason == (
        f"certificate is for {mail_lab_certs.wrong_name}, not {mail_lab_certs.mismatch_name}"
        f" (localhost:{port})"
    )


def test_wrong_port_tls_where_none_is_spoken(
    probe: ConnectionProbe, dovecot: DovecotLab, lab_user: LabUser
) -> None:
    server = lab_server(dovecot, lab_user, tls=True, port=dovecot.imap_port)
    result = probe(server, lab_user.password)
    assert not result.ok and result.category == "tls"
    assert result.reason == (
        f"localhost:{dovecot.imap_port} does not speak TLS on this port: "
        "check the port and the TLS box"
    )


def test_wrong_port_another_protocol(
    probe: ConnectionProbe, dovecot: DovecotLab, lab_user: LabUser
) -> None:
    server = lab_server(dovecot, lab_user, tls=False, port=dovecot.pop3_port)
    result = probe(server, lab_user.password)
    assert not result.ok and result.category == "protocol"
    assert result.reason == (
        f"localhost:{dovecot.pop3_port} does not answer like an IMAP server: is this its IMAP port?"
    )


def test_closed_port(probe: ConnectionProbe, dovecot: DovecotLab, lab_user: LabUser) -> None:
    port = closed_port()
    result = probe(lab_server(dovecot, lab_user, host="127.0.0.1", port=port), "x")
    assert not result.ok and result.category == "refused"
    assert result.reason == f"connection refused by 127.0.0.1:{port}"


def test_no_routing_plan(probe: ConnectionProbe, dovecot: DovecotLab, lab_user: LabUser) -> None:
    result = probe(lab_server(dovecot, lab_user, routing_plan_id=None), lab_user.password)
    assert not result.ok and result.reason == NO_ROUTING_PLAN == "no routing plan linked"
    assert result.category == "no_routing_plan"


def test_a_silent_server_is_bounded_by_the_timeout(
    probe: ConnectionProbe, dovecot: DovecotLab, lab_user: LabUser
) -> None:
    with listening_port() as port:  # accepts, never greets
        started = time.monotonic()
        result = probe(lab_server(dovecot, lab_user, host="127.0.0.1", port=port), "x")
        elapsed = time.monotonic() - started
    assert not result.ok and result.category == "timeout"
    assert result.reason == f"no answer from 127.0.0.1:{port} in time"
    assert elapsed < 2.0 * 2 + 1.5


def test_oauth2_says_it_comes_later(
    probe: ConnectionProbe, dovecot: DovecotLab, lab_user: LabUser
) -> None:
    server = lab_server(dovecot, lab_user, auth_type=AuthType.OAUTH2, oauth_provider="google")
    result = probe(server, None)
    assert not result.ok and result.reason is not None and "OAuth2" in result.reason


# --- POP3 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "stls"])
def test_pop3_ok(probe: ConnectionProbe, dovecot: DovecotLab, lab_user: LabUser, tls: bool) -> None:
    result = probe(lab_server(dovecot, lab_user, ServerType.POP3, tls=tls), lab_user.password)
    assert result.ok, result.reason
    assert "UIDL" in result.capabilities
    assert ("STLS" in result.capabilities) is not tls


def test_pop3_wrong_password(
    probe: ConnectionProbe, dovecot: DovecotLab, lab_user: LabUser
) -> None:
    result = probe(lab_server(dovecot, lab_user, ServerType.POP3), "not-the-password")
    assert not result.ok and result.category == "authentication"
    assert result.reason is not None and result.reason.startswith("authentication failed")


# --- SMTP ----------------------------------------------------------------------------------


def test_smtp_ok_with_starttls_and_auth_mechanisms(
    probe: ConnectionProbe, smtp_lab: SmtpLab
) -> None:
    stored = smtp_lab.count()  # the session's SMTP lab may hold earlier tests' mail
    result = probe(smtp_lab_server(smtp_lab), smtp_lab.users[SMTP_LAB_USER])
    assert result.ok, result.reason
    assert {"STARTTLS", "AUTH=PLAIN", "AUTH=LOGIN"} <= set(result.capabilities)
    implicit = probe(
        smtp_lab_server(smtp_lab, tls=True, port=smtp_lab.tls_port), smtp_lab.users[SMTP_LAB_USER]
    )
    assert implicit.ok and "STARTTLS" not in implicit.capabilities
    assert smtp_lab.count() == stored  # a probe never sends


def test_smtp_wrong_password(probe: ConnectionProbe, smtp_lab: SmtpLab) -> None:
    result = probe(smtp_lab_server(smtp_lab), "not-the-password")
    assert not result.ok and result.category == "authentication"
    assert result.reason is not None and result.reason.startswith("authentication failed")


def test_smtp_certificate_for_another_name(probe: ConnectionProbe, smtp_lab: SmtpLab) -> None:
    server = replace(smtp_lab_server(smtp_lab), sni_hostname="mx.example.org")
    result = probe(server, smtp_lab.users[SMTP_LAB_USER])
    assert result.category == "certificate"
    assert result.reason == (
        f"certificate is for localhost, 127.0.0.1, not mx.example.org (127.0.0.1:{smtp_lab.port})"
    )
