"""The IMAP adapter against the real Dovecot lab: TLS, STARTTLS, SNI, COMPRESS, reasons."""

from __future__ import annotations

import pytest

from shared.contracts.status_reports import FailureCategory
from shared.email_servers import ServerType
from shared.mail.errors import MailServerError
from shared.mail.imap import ImapMailbox
from tests.lab.certs import LabCertificates
from tests.lab.dovecot import NON_ASCII_FOLDER, DovecotLab, LabUser
from tests.support.leaks import password
from tests.support.mail_servers import lab_connector, lab_server
from tests.support.tcp import closed_port

MAIL = b"From: a@example.org\r\nSubject: Gr\xfc\xdfe\r\n\r\nbody \xe4\r\n"


def open_mailbox(
    dovecot: DovecotLab, user: LabUser, certs: LabCertificates, **kw: object
) -> ImapMailbox:
    tls = bool(kw.pop("tls", True))
    password = kw.pop("password", user.password)
    server = lab_server(dovecot, user, ServerType.IMAP, tls=tls, **kw)
    mailbox = ImapMailbox(server, str(password), lab_connector(certs))
    mailbox.open()
    return mailbox


@pytest.mark.parametrize("tls", [True, False], ids=["implicit-tls", "starttls"])
@pytest.mark.parametrize("disable_compression", [False, True], ids=["deflate", "plain"])
def test_mails_are_read_byte_identical_and_marked_seen(
    dovecot: DovecotLab,
    lab_user: LabUser,
    mail_lab_certs: LabCertificates,
    tls: bool,
    disable_compression: bool,
) -> None:
    uid = dovecot.append(lab_user.name, MAIL, NON_ASCII_FOLDER)
    mailbox = open_mailbox(
        dovecot,
        lab_user,
        mail_lab_certs,
        tls=tls,
        inbox_folder=NON_ASCII_FOLDER,
        disable_compression=disable_compression,
    )
    try:
        assert mailbox.compressed is (not disable_compression)
        assert mailbox.uids_after(0) == [uid]
        assert mailbox.bodies({uid: len(MAIL)}) == {uid: MAIL}
        assert dovecot.seen(lab_user.name, NON_ASCII_FOLDER) == set()  # PEEK kept it unread
        mailbox.mark_seen([uid])
        assert dovecot.seen(lab_user.name, NON_ASCII_FOLDER) == {uid}
        assert mailbox.uids_after(uid) == []
    finally:
        mailbox.close()


def test_sni_name_is_what_the_certificate_is_checked_against(
    dovecot: DovecotLab, lab_user: LabUser, mail_lab_certs: LabCertificates
) -> None:
    mailbox = open_mailbox(
        dovecot, lab_user, mail_lab_certs, host="127.0.0.1", sni_hostname=mail_lab_certs.sni_name
    )
    mailbox.close()
    with pytest.raises(MailServerError) as refused:
        open_mailbox(dovecot, lab_user, mail_lab_certs, sni_hostname=mail_lab_certs.wrong_name)
    assert refused.value.category is FailureCategory.CERTIFICATE
    assert mail_lab_certs.wrong_name in refused.value.reason


def test_idle_announces_a_new_mail(
    dovecot: DovecotLab, lab_user: LabUser, mail_lab_certs: LabCertificates
) -> None:
    mailbox = open_mailbox(dovecot, lab_user, mail_lab_certs)
    try:
        assert mailbox.supports_idle
        with mailbox.idling() as watch:
            assert watch.news(0.2) is False
            dovecot.append(lab_user.name, MAIL)
            assert any(watch.news(0.5) for _ in range(6))
    finally:
        mailbox.close()


def test_failures_carry_a_category_and_an_admin_readable_reason(
    dovecot: DovecotLab, lab_user: LabUser, mail_lab_certs: LabCertificates
) -> None:
    cases: dict[FailureCategory, dict[str, object]] = {
        FailureCategory.AUTHENTICATION: {"password": "wrong"},
        FailureCategory.FOLDER_MISSING: {"inbox_folder": "Nicht da"},
        FailureCategory.REFUSED: {"port": closed_port()},
        FailureCategory.DNS: {"host": "no-such-host.invalid"},
    }
    reasons = {}
    for category, overrides in cases.items():
        with pytest.raises(MailServerError) as failure:
            open_mailbox(dovecot, lab_user, mail_lab_certs, **overrides)
        assert failure.value.category is category, failure.value.reason
        reasons[category] = failure.value.reason
    assert reasons[FailureCategory.AUTHENTICATION].startswith("authentication failed: server said")
    assert reasons[FailureCategory.FOLDER_MISSING] == "folder 'Nicht da' does not exist"
    assert reasons[FailureCategory.REFUSED].startswith("connection refused by localhost:")


def test_non_ascii_credentials_log_in_with_authenticate_plain(
    dovecot: DovecotLab, mail_lab_certs: LabCertificates
) -> None:
    """REQUIREMENTS allow any Unicode in passwords; IMAP LOGIN carries ASCII only."""
    user = dovecot.add_user(f"umlaut{closed_port()}", password("Grüße-ß-€"))
    mailbox = open_mailbox(dovecot, user, mail_lab_certs)
    mailbox.close()


def test_sizes_of_tens_of_thousands_of_mails_stay_within_the_servers_line_limit(
    dovecot: DovecotLab, lab_user: LabUser, mail_lab_certs: LabCertificates
) -> None:
    """A first visit may find 20,000 unread mails; one FETCH naming them all is longer than
    Dovecot accepts ("Too long argument"). UIDs the folder lacks are simply not answered, so
    naming 20,000 of them shows the limit without storing 20,000 mails."""
    uid = dovecot.append(lab_user.name, MAIL)
    mailbox = open_mailbox(dovecot, lab_user, mail_lab_certs)
    try:
        assert mailbox.sizes(list(range(1, 20_001))) == {uid: len(MAIL)}
    finally:
        mailbox.close()
