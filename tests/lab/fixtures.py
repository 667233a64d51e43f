"""Pytest fixtures for the mail lab; import them into a conftest or a test module.

    from tests.lab.fixtures import dovecot, lab_user, mail_lab_certs  # noqa: F401

``oauth_lab`` runs the lab's OAuth2 authorization server (``tests.lab.oauth_server``) and makes
the session's ``dovecot`` and ``smtp_lab`` accept its tokens (XOAUTH2, OAUTHBEARER).

A missing Dovecot is installed by ``scripts/install-mail-lab``; if that fails the fixture
raises, so the tests that need the lab fail (they never skip).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.lab.certs import LabCertificates, issue
from tests.lab.dovecot import DovecotLab, LabUser, ensure_installed
from tests.lab.hostile_servers import FLOOD_LINE, FakeServer, Protocol, Script, Security
from tests.lab.oauth_server import OAuthLab
from tests.lab.smtp_server import SmtpLab
from tests.support.leaks import OTHER_SECRETS, password


@pytest.fixture(scope="session")
def mail_lab_certs(tmp_path_factory: pytest.TempPathFactory) -> LabCertificates:
    """The lab CA and server certificates (``localhost``/127.0.0.1, SNI names)."""
    return issue(tmp_path_factory.mktemp("mail-lab-certs"))


@pytest.fixture(scope="session")
def dovecot(mail_lab_certs: LabCertificates) -> Iterator[DovecotLab]:
    """One running Dovecot for the session; tests keep apart by using their own users.

    A test that stops the server must start it again before it ends.
    """
    ensure_installed()
    with DovecotLab(mail_lab_certs) as lab:
        yield lab


@pytest.fixture
def lab_user(dovecot: DovecotLab) -> LabUser:
    """A fresh mailbox owner on the session's Dovecot: empty INBOX and ``Eingang Ü``."""
    return dovecot.new_user()


# --- SMTP (sender issue) -----------------------------------------------------------------------

SMTP_LAB_USER = "sender@lab.test"
SMTP_DEFAULT_USER = "system@default.test"


@pytest.fixture(scope="session")
def smtp_lab(mail_lab_certs: LabCertificates) -> Iterator[SmtpLab]:
    """One aiosmtpd process for the session (STARTTLS port and implicit-TLS port, AUTH), which
    offers PIPELINING as the providers' servers do.

    Its users: ``SMTP_LAB_USER`` and ``agent1..3@lab.test``, with passwords from
    ``tests.support.leaks.password``; ``smtp_lab.users`` has them. Tests call ``clear()``.
    """
    users = {SMTP_LAB_USER: password("smtp")}
    users.update({f"agent{n}@lab.test": password(f"agent{n}") for n in (1, 2, 3)})
    with SmtpLab(mail_lab_certs, users, "smtp", pipelining=True) as lab:
        yield lab


@pytest.fixture(scope="session")
def smtp_default_lab(mail_lab_certs: LabCertificates) -> Iterator[SmtpLab]:
    """A second SMTP sink: the system's default SMTP server (template mail fallback). It does
    not offer PIPELINING (aiosmtpd's default), so mail to it goes one command at a time."""
    with SmtpLab(mail_lab_certs, {SMTP_DEFAULT_USER: password("default")}, "default") as lab:
        yield lab


# --- OAuth2 -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def oauth_lab(dovecot: DovecotLab, smtp_lab: SmtpLab) -> Iterator[OAuthLab]:
    """The lab's OAuth2 authorization server for the session; ``dovecot`` and ``smtp_lab``
    trust its tokens (so it starts them too).

    ``oauth_lab.provider_json()`` is the product's provider entry; ``oauth_lab.token_for(user)``
    runs the code flow for a lab user. A missing Node.js fails the tests that need it. A test
    that changes the token lifetime calls ``oauth_lab.reset()`` before it ends; another SMTP
    lab (``smtp_default_lab``) can call ``trust_oauth(oauth_lab)`` itself.
    """
    with OAuthLab() as lab:
        dovecot.trust_oauth(lab)
        smtp_lab.trust_oauth(lab)
        yield lab
        # The session's leak check (it runs after this) looks for every token it issued.
        OTHER_SECRETS.update(lab.issued_tokens())


# --- hostile servers (issue 20) -----------------------------------------------------------------


@pytest.fixture(name="hostile_servers")
def hostile_servers_fixture(
    mail_lab_certs: LabCertificates, tmp_path: Path
) -> Iterator[Callable[..., FakeServer]]:
    """``hostile_servers``: starts fake mail servers that misbehave on script
    (``tests.lab.hostile_servers``):
    ``hostile_servers(Protocol.IMAP, Script.DEFLATE_BOMB, security=Security.STARTTLS)``. TLS
    uses the lab's certificate for ``localhost``/127.0.0.1; each server is stopped when the
    test ends, its recordings kept in the test's ``tmp_path``.
    """
    started: list[FakeServer] = []

    def start(
        protocol: Protocol,
        script: Script = Script.POLITE,
        *,
        security: Security = Security.PLAIN,
        mails: list[bytes] | None = None,
        flood_line: int = FLOOD_LINE,
    ) -> FakeServer:
        directory = tmp_path / f"fake-{len(started) + 1}-{protocol}"
        fake = FakeServer(
            protocol,
            script,
            security=security,
            certs=mail_lab_certs,
            mails=mails,
            directory=directory,
            flood_line=flood_line,
        )
        started.append(fake)
        fake.start()
        return fake

    yield start
    for fake in started:
        fake.stop()
