"""Pytest fixtures for the mail lab; import them into a conftest or a test module.

    from tests.lab.fixtures import dovecot, lab_user, mail_lab_certs  # noqa: F401

A missing Dovecot is installed by ``scripts/install-mail-lab``; if that fails the fixture
raises, so the tests that need the lab fail (they never skip).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.lab.certs import LabCertificates, issue
from tests.lab.dovecot import DovecotLab, LabUser, ensure_installed


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
