"""The mail lab works: a real Dovecot over IMAP and POP3, TLS, SNI, IDLE and COMPRESS.

Standard library clients only (``tests.lab.clients``); the project's own IMAP and POP3
code is tested against this lab elsewhere. Dovecot missing → installed by the fixture, or
the tests fail; they never skip.
"""

from __future__ import annotations

import contextlib
import imaplib
import socket
import ssl
import time

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from tests.lab.certs import LabCertificates
from tests.lab.clients import LabIMAP4, LabIMAP4_SSL, LabPOP3, LabPOP3_SSL, tls_context
from tests.lab.dovecot import HOST, NON_ASCII_FOLDER, NON_ASCII_FOLDER_WIRE, DovecotLab, LabUser

FOLDER_ON_THE_WIRE = f'"{NON_ASCII_FOLDER_WIRE}"'


@pytest.fixture
def ctx(mail_lab_certs: LabCertificates) -> ssl.SSLContext:
    return tls_context(str(mail_lab_certs.ca))


def mail(n: int, subject: str = "Lab") -> bytes:
    """A CRLF mail with 8-bit bytes in its body (Latin-1, undeclared): what real mail is like."""
    return (
        f"From: sender{n}@example.org\r\nTo: inbox@example.org\r\n"
        f"Subject: {subject} {n}\r\nMessage-ID: <lab-{n}@example.org>\r\n\r\n"
    ).encode() + b"Gr\xfc\xdfe, line one\r\n..a line starting with a dot\r\n"


def fetch_all(im: imaplib.IMAP4) -> list[bytes]:
    typ, data = im.uid("FETCH", "1:*", "(BODY.PEEK[])")
    assert typ == "OK", data
    return [part[1] for part in data if isinstance(part, tuple)]


def peer_names(sock: socket.socket) -> object:
    """The subjectAltName entries of the verified peer certificate."""
    assert isinstance(sock, ssl.SSLSocket)
    peer = sock.getpeercert()
    assert peer is not None
    return peer["subjectAltName"]


def common_name(der: bytes) -> str:
    cert = x509.load_der_x509_certificate(der)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def test_imaps_certificate_verifies_for_localhost_and_127_0_0_1(
    dovecot: DovecotLab,
    lab_user: LabUser,
    ctx: ssl.SSLContext,
) -> None:
    for name in ("localhost", "127.0.0.1"):
        im = LabIMAP4_SSL(name, dovecot.imaps_port, ctx)
        try:
            assert isinstance(im.sock, ssl.SSLSocket)
            assert im.sock.version() in {"TLSv1.2", "TLSv1.3"}
            names = peer_names(im.sock)
            assert isinstance(names, tuple)
            assert ("DNS", "localhost") in names
            assert ("IP Address", "127.0.0.1") in names
            assert im.login(lab_user.name, lab_user.password)[0] == "OK"
        finally:
            im.logout()


def test_starttls_upgrades_the_plain_imap_port(
    dovecot: DovecotLab,
    lab_user: LabUser,
    ctx: ssl.SSLContext,
) -> None:
    im = LabIMAP4("localhost", dovecot.imap_port)
    try:
        assert "STARTTLS" in im.capabilities
        assert not isinstance(im.sock, ssl.SSLSocket)
        assert im.starttls(ctx)[0] == "OK"
        assert isinstance(im.sock, ssl.SSLSocket)
        assert im.login(lab_user.name, lab_user.password)[0] == "OK"
    finally:
        im.logout()


def test_the_plain_port_also_accepts_a_login_without_tls(
    dovecot: DovecotLab,
    lab_user: LabUser,
) -> None:
    im = LabIMAP4(HOST, dovecot.imap_port)
    try:
        assert im.login(lab_user.name, lab_user.password)[0] == "OK"
    finally:
        im.logout()


def test_sni_name_gets_its_own_certificate(
    dovecot: DovecotLab,
    mail_lab_certs: LabCertificates,
    ctx: ssl.SSLContext,
) -> None:
    im = LabIMAP4_SSL(mail_lab_certs.sni_name, dovecot.imaps_port, ctx)
    try:
        assert peer_names(im.sock) == (("DNS", "mail.lab.test"),)
    finally:
        im.logout()
    pop = LabPOP3_SSL(mail_lab_certs.sni_name, dovecot.pop3s_port, ctx)
    try:
        assert peer_names(pop.sock) == (("DNS", "mail.lab.test"),)
    finally:
        pop.quit()


@pytest.mark.parametrize(
    ("name", "trust_lab_ca", "reason"),
    [
        ("wrong.example", True, "Hostname mismatch"),  # default cert is for localhost
        ("mismatch.lab.test", True, "Hostname mismatch"),  # served the wrong.example cert
        ("localhost", False, "unable to get local issuer certificate"),  # unknown CA
    ],
)
def test_certificate_failures_are_certificate_errors(
    dovecot: DovecotLab,
    mail_lab_certs: LabCertificates,
    name: str,
    trust_lab_ca: bool,
    reason: str,
) -> None:
    context = tls_context(str(mail_lab_certs.ca) if trust_lab_ca else None)
    with pytest.raises(ssl.SSLCertVerificationError, match=reason):
        LabIMAP4_SSL(name, dovecot.imaps_port, context)
    with pytest.raises(ssl.SSLCertVerificationError, match=reason):
        LabPOP3_SSL(name, dovecot.pop3s_port, context)
    im = LabIMAP4(name, dovecot.imap_port)
    try:
        with pytest.raises(ssl.SSLCertVerificationError, match=reason):
            im.starttls(context)
    finally:
        with contextlib.suppress(OSError):  # the failed handshake closed the socket
            im.shutdown()


def test_mismatch_name_is_served_the_certificate_for_wrong_example(
    dovecot: DovecotLab,
    mail_lab_certs: LabCertificates,
) -> None:
    unchecked = ssl.create_default_context()
    unchecked.check_hostname = False
    unchecked.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((HOST, dovecot.imaps_port), timeout=5) as raw,
        unchecked.wrap_socket(raw, server_hostname=mail_lab_certs.mismatch_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    assert common_name(der) == mail_lab_certs.wrong_name == "wrong.example"


def test_capabilities_after_login_include_idle_and_compress(
    dovecot: DovecotLab,
    lab_user: LabUser,
    ctx: ssl.SSLContext,
) -> None:
    im = LabIMAP4_SSL("localhost", dovecot.imaps_port, ctx)
    try:
        im.login(lab_user.name, lab_user.password)
        typ, data = im.capability()
        assert typ == "OK"
        capabilities = data[0].split()
        assert b"IDLE" in capabilities
        assert b"COMPRESS=DEFLATE" in capabilities
    finally:
        im.logout()


def test_non_ascii_folder_exists_and_can_be_selected(
    dovecot: DovecotLab,
    lab_user: LabUser,
    ctx: ssl.SSLContext,
) -> None:
    dovecot.append(lab_user.name, mail(1), folder=NON_ASCII_FOLDER)
    im = LabIMAP4_SSL("localhost", dovecot.imaps_port, ctx)
    try:
        im.login(lab_user.name, lab_user.password)
        typ, listing = im.list()
        assert typ == "OK"
        assert any(FOLDER_ON_THE_WIRE.encode() in line for line in listing if line)
        typ, exists = im.select(FOLDER_ON_THE_WIRE, readonly=True)
        assert (typ, exists) == ("OK", [b"1"])
        assert fetch_all(im) == [mail(1)]
    finally:
        im.logout()


@pytest.mark.parametrize("folder", ["INBOX", NON_ASCII_FOLDER])
def test_appended_mail_comes_back_byte_identical_and_seen_is_visible(
    dovecot: DovecotLab,
    lab_user: LabUser,
    ctx: ssl.SSLContext,
    folder: str,
) -> None:
    sent = [mail(n) for n in range(5)] + [b"", b"Subject: no body, no final line end"]
    uids = [dovecot.append(lab_user.name, raw, folder=folder) for raw in sent]
    assert uids == list(range(1, len(sent) + 1))
    assert dovecot.count(lab_user.name, folder) == len(sent)
    assert dovecot.seen(lab_user.name, folder) == set()

    im = LabIMAP4_SSL("localhost", dovecot.imaps_port, ctx)
    try:
        im.login(lab_user.name, lab_user.password)
        wire = "INBOX" if folder == "INBOX" else FOLDER_ON_THE_WIRE
        assert im.select(wire)[0] == "OK"
        assert fetch_all(im) == sent
        assert im.uid("STORE", "1:3", "+FLAGS.SILENT", "(\\Seen)")[0] == "OK"
    finally:
        im.logout()
    assert dovecot.seen(lab_user.name, folder) == {1, 2, 3}
    assert dovecot.unseen(lab_user.name, folder) == len(sent) - 3
    assert dovecot.flags(lab_user.name, folder)[1] == {"\\Seen"}


def test_bare_lf_mail_comes_back_with_crlf(
    dovecot: DovecotLab,
    lab_user: LabUser,
) -> None:
    """Pinned Dovecot behaviour: IMAP returns CRLF line ends, whatever was delivered."""
    raw = b"Subject: unix line ends\n\nbody\n"
    dovecot.append(lab_user.name, raw)
    im = LabIMAP4(HOST, dovecot.imap_port)
    try:
        im.login(lab_user.name, lab_user.password)
        im.select("INBOX", readonly=True)
        assert fetch_all(im) == [raw.replace(b"\n", b"\r\n")]
    finally:
        im.logout()


def test_compress_deflate_carries_a_whole_session(
    dovecot: DovecotLab,
    lab_user: LabUser,
    ctx: ssl.SSLContext,
) -> None:
    sent = [mail(n) + b"padding padding padding padding\r\n" * 200 for n in range(3)]
    for raw in sent:
        dovecot.append(lab_user.name, raw, folder=NON_ASCII_FOLDER)
    im = LabIMAP4_SSL("localhost", dovecot.imaps_port, ctx)
    try:
        im.login(lab_user.name, lab_user.password)
        im.compress()
        assert im.select(FOLDER_ON_THE_WIRE)[0] == "OK"
        assert fetch_all(im) == sent
        assert im.noop()[0] == "OK"
        assert 0 < im.compressed_bytes_received < sum(map(len, sent)) / 4
    finally:
        im.logout()


def test_idle_announces_a_new_mail_within_two_seconds(
    dovecot: DovecotLab,
    lab_user: LabUser,
    ctx: ssl.SSLContext,
) -> None:
    im = LabIMAP4_SSL("localhost", dovecot.imaps_port, ctx)
    try:
        im.login(lab_user.name, lab_user.password)
        im.select("INBOX")
        im.send(b"lab1 IDLE\r\n")
        assert im.readline().startswith(b"+ ")
        started = time.monotonic()
        dovecot.append(lab_user.name, mail(1))
        im.sock.settimeout(3)
        while (line := im.readline()) != b"* 1 EXISTS\r\n":
            assert line.startswith(b"* "), line
        latency = time.monotonic() - started
        im.send(b"DONE\r\n")
        while not (line := im.readline()).startswith(b"lab1 "):
            pass
        assert line.startswith(b"lab1 OK"), line
        assert latency < 2, f"IDLE announced the mail after {latency:.2f} s"
    finally:
        im.logout()


def test_pop3s_login_stat_retr_dele(
    dovecot: DovecotLab,
    lab_user: LabUser,
    ctx: ssl.SSLContext,
) -> None:
    sent = [mail(n) for n in range(3)]
    for raw in sent:
        dovecot.append(lab_user.name, raw)
    pop = LabPOP3_SSL("localhost", dovecot.pop3s_port, ctx)
    pop.user(lab_user.name)
    pop.pass_(lab_user.password)
    count, size = pop.stat()
    assert count == 3
    assert size == sum(map(len, sent))
    for n, raw in enumerate(sent, start=1):
        _, lines, _ = pop.retr(n)
        assert b"\r\n".join(lines) + b"\r\n" == raw
        pop.dele(n)
    pop.quit()
    assert dovecot.count(lab_user.name) == 0


def test_pop3_stls_upgrades_the_plain_port(
    dovecot: DovecotLab,
    lab_user: LabUser,
    ctx: ssl.SSLContext,
) -> None:
    dovecot.append(lab_user.name, mail(1))
    pop = LabPOP3("localhost", dovecot.pop3_port)
    assert "STLS" in pop.capa()
    pop.stls(ctx)
    assert isinstance(pop.sock, ssl.SSLSocket)
    pop.user(lab_user.name)
    pop.pass_(lab_user.password)
    assert pop.stat()[0] == 1
    pop.quit()


def test_a_wrong_password_is_refused_and_costs_later_logins_nothing(
    dovecot: DovecotLab,
    lab_user: LabUser,
) -> None:
    for _ in range(2):  # with Dovecot's penalty on, the second would wait 2-4 s more
        im = LabIMAP4(HOST, dovecot.imap_port, source="127.0.0.2")
        try:
            with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
                im.login(lab_user.name, "wrong")
        finally:
            im.logout()
    started = time.monotonic()
    im = LabIMAP4(HOST, dovecot.imap_port, source="127.0.0.2")
    try:
        assert im.login(lab_user.name, lab_user.password)[0] == "OK"
    finally:
        im.logout()
    assert time.monotonic() - started < 1, "the lab's auth penalty should be off"


def test_stop_refuses_connections_and_start_brings_the_server_back(
    dovecot: DovecotLab,
    lab_user: LabUser,
    ctx: ssl.SSLContext,
) -> None:
    dovecot.append(lab_user.name, mail(1))
    im = LabIMAP4_SSL("localhost", dovecot.imaps_port, ctx)
    im.login(lab_user.name, lab_user.password)
    im.select("INBOX")
    try:
        dovecot.stop()
        assert not dovecot.running
        for port in dovecot.ports.values():
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((HOST, port), timeout=2).close()
        with pytest.raises((imaplib.IMAP4.abort, OSError)):
            im.noop()  # the open session was dropped with the server
    finally:
        started = time.monotonic()
        dovecot.start()
        took = time.monotonic() - started
        im.shutdown()
    assert took < 3, f"the lab took {took:.2f} s to start"
    im = LabIMAP4_SSL("localhost", dovecot.imaps_port, ctx)
    try:
        im.login(lab_user.name, lab_user.password)
        assert im.select("INBOX", readonly=True) == ("OK", [b"1"])
        assert fetch_all(im) == [mail(1)]
    finally:
        im.logout()
