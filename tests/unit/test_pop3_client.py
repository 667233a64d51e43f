"""Mailroom's POP3 client against a scripted server on loopback: any mail comes back exactly as
the server sent it, and whatever the server sends is bounded."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import pytest

from shared.email_servers import AuthType, EmailServer, ServerType
from shared.mail.connector import Connector
from shared.mail.errors import MailServerError
from shared.mail.guarded_socket import AnswerTooLarge
from shared.mail.pop3 import MailLargerThanListed, Pop3Mailbox, retr_budget
from shared.settings import Settings

Answer = Callable[[bytes], bytes | None]


@dataclass
class ScriptedPop3:
    """One POP3 session at a time on 127.0.0.1, serving ``mails`` (as stored: the server
    dot-stuffs them). ``listed`` overrides a mail's LIST size, ``answers`` a command's whole
    answer (by its verb; None falls back to the default), ``greeting`` and ``capa`` the
    session's start. Every line received is kept in ``received``."""

    mails: list[bytes] = field(default_factory=list)
    listed: dict[int, int] = field(default_factory=dict)
    uidls: dict[int, bytes] = field(default_factory=dict)
    answers: dict[str, Answer] = field(default_factory=dict)  # "*": any other line
    greeting: bytes = b"+OK scripted\r\n"
    capa: list[bytes] = field(default_factory=lambda: [b"UIDL", b"TOP", b"USER"])
    received: list[bytes] = field(default_factory=list)

    @contextlib.contextmanager
    def running(self) -> Iterator[int]:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(4)
            listener.settimeout(0.2)
            stop = threading.Event()
            thread = threading.Thread(target=self._serve, args=(listener, stop), daemon=True)
            thread.start()
            try:
                yield int(listener.getsockname()[1])
            finally:
                stop.set()
                thread.join(5)

    def _serve(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn, conn.makefile("rb") as lines:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    self._session(conn, lines)

    def _session(self, conn: socket.socket, lines: BinaryIO) -> None:
        conn.sendall(self.greeting)
        while line := lines.readline():
            self.received.append(line)
            verb, _, argument = line.strip().partition(b" ")
            name = verb.decode(errors="replace").upper()
            custom = self.answers.get(name if name in _VERBS else "*")
            answer = custom(argument) if custom is not None else None
            conn.sendall(answer if answer is not None else self._default(verb.upper(), argument))
            if verb.upper() == b"QUIT":
                return

    def _default(self, verb: bytes, argument: bytes) -> bytes:
        if verb == b"CAPA":
            return b"+OK\r\n" + b"".join(c + b"\r\n" for c in self.capa) + b".\r\n"
        if verb == b"STAT":
            return f"+OK {len(self.mails)} {sum(map(len, self.mails))}\r\n".encode()
        if verb == b"LIST":
            return _multiline(f"{n} {self._size(n)}".encode() for n in self._numbers())
        if verb == b"UIDL":
            return _multiline(
                b"%d %s" % (n, self.uidls.get(n, b"u%d" % n)) for n in self._numbers()
            )
        if verb == b"RETR":
            return b"+OK\r\n" + stuffed(self.mails[int(argument) - 1]) + b".\r\n"
        if verb == b"TOP":
            mail = self.mails[int(argument.split()[0]) - 1]
            head = mail.split(b"\r\n\r\n", 1)[0] + b"\r\n" if b"\r\n\r\n" in mail else mail
            return b"+OK\r\n" + stuffed(head) + b".\r\n"
        return b"+OK\r\n"

    def _numbers(self) -> range:
        return range(1, len(self.mails) + 1)

    def _size(self, number: int) -> int:
        return self.listed.get(number, len(self.mails[number - 1]))


_VERBS = frozenset(["CAPA", "STLS", "USER", "PASS", "AUTH", "STAT", "LIST", "UIDL", "RETR", "TOP"])
_VERBS |= {"DELE", "NOOP", "QUIT"}


def _multiline(lines: Iterator[bytes]) -> bytes:
    return b"+OK\r\n" + b"".join(line + b"\r\n" for line in lines) + b".\r\n"


def stuffed(mail: bytes) -> bytes:
    """The mail as a POP3 server sends it: a dot doubled at each line start, and a line break
    of its own before the terminator when the mail lacks a final one."""
    wire = re.sub(rb"(^|\n)\.", rb"\1..", mail)
    return wire if wire.endswith(b"\n") or not wire else wire + b"\r\n"


def server_at(port: int, **changes: object) -> EmailServer:
    values: dict[str, object] = {
        "id": "00000000-0000-0000-0000-000000000001",
        "tenant_id": "acme",
        "type": ServerType.POP3,
        "name": "scripted",
        "host": "127.0.0.1",
        "port": port,
        "tls": False,
        "auth_type": AuthType.BASIC,
        "enabled": True,
        "version": 1,
        "username": "user",
        "routing_plan_id": "plan",
    }
    values.update(changes)
    return EmailServer(**values)  # type: ignore[arg-type]


@pytest.fixture
def connector() -> Connector:
    return Connector.from_settings(Settings(), timeout=5.0)


@contextlib.contextmanager
def session(fake: ScriptedPop3, connector: Connector, **changes: object) -> Iterator[Pop3Mailbox]:
    with fake.running() as port:
        mailbox = Pop3Mailbox(server_at(port, **changes), "secret", connector)
        mailbox.open()
        try:
            yield mailbox
        finally:
            mailbox.close()


HOSTILE_LINES = {
    "a 100 KB line": b"Subject: long\r\n\r\n" + b"a" * 100_000 + b"\r\nafter\r\n",
    "bare LF": b"Subject: lf\nX: y\n\nbody\nline\n",
    "bare CR": b"Subject: cr\r\nX: a\rb\r\n\r\nbo\rdy\r\n",
    "CR CR LF": b"Subject: m\r\n\r\nc\r\r\nd\n\r\n",
    "dots at line starts": b"Subject: d\r\n\r\n.\r\n..\r\n.x\r\n.\n",
    "NUL and 8-bit": b"Subject: \xc4\x00\r\n\r\n\xff\x00\xfe\r\n",
    "no final line break": b"Subject: x\r\n\r\nend",
}


@pytest.mark.parametrize("mail", HOSTILE_LINES.values(), ids=HOSTILE_LINES.keys())
def test_a_mail_comes_back_exactly_as_the_server_sent_it(mail: bytes, connector: Connector) -> None:
    fake = ScriptedPop3(mails=[mail, b"Subject: next\r\n\r\nnext\r\n"])
    with session(fake, connector) as mailbox:
        listing = mailbox.listing()
        got = [mailbox.retrieve(message.number) for message in listing]
    # Line ends as sent; only a mail without a final line break gets the server's CRLF.
    assert got == [mail if mail.endswith(b"\n") else mail + b"\r\n", fake.mails[1]]


def test_a_five_megabyte_line_is_read_in_pieces(connector: Connector) -> None:
    mail = b"Subject: huge\r\n\r\n" + b"b" * (5 * 1024 * 1024) + b"\r\n"
    fake = ScriptedPop3(mails=[mail])
    with session(fake, connector) as mailbox:
        mailbox.listing()
        assert mailbox.retrieve(1) == mail


def test_a_mail_larger_than_listed_is_refused_with_a_reason(connector: Connector) -> None:
    fake = ScriptedPop3(
        mails=[b"Subject: liar\r\n\r\n" + b"x" * 200_000 + b"\r\n"], listed={1: 100}
    )
    with session(fake, connector) as mailbox:
        mailbox.listing()
        with pytest.raises(MailLargerThanListed) as refused:
            mailbox.retrieve(1)
    assert refused.value.reason == "the server sent more than the 100 bytes it listed for this mail"
    assert isinstance(refused.value, AnswerTooLarge)


def test_a_mail_within_its_slack_is_handed_back_whole(connector: Connector) -> None:
    mail = b"Subject: close\r\n\r\n" + b"y" * 5000 + b"\r\n"
    fake = ScriptedPop3(mails=[mail], listed={1: len(mail) - 500})
    with session(fake, connector) as mailbox:
        mailbox.listing()
        assert len(mail) <= retr_budget(len(mail) - 500)
        assert mailbox.retrieve(1) == mail


def test_an_endless_header_block_is_cut_at_the_answer_limit(connector: Connector) -> None:
    header = b"".join(b"X-Filler-%d: %s\r\n" % (n, b"h" * 100) for n in range(20_000))
    mail = header + b"\r\nbody\r\n"
    fake = ScriptedPop3(mails=[mail])
    with session(fake, connector) as mailbox:
        mailbox.listing()
        head = mailbox.header(1)
        assert mailbox.retrieve(1) == mail  # the session goes on after the cut header
    assert head == header[: connector.limits.max_bytes]


def test_a_top_answer_beyond_the_mail_is_refused(connector: Connector) -> None:
    endless = b"+OK\r\n" + b"X-Loop: " + b"z" * (3 * 1024 * 1024) + b"\r\n.\r\n"
    fake = ScriptedPop3(mails=[b"Subject: s\r\n\r\nbody\r\n"], answers={"TOP": lambda _: endless})
    with session(fake, connector) as mailbox:
        mailbox.listing()
        with pytest.raises(MailLargerThanListed, match="in its answer to TOP 1 0"):
            mailbox.header(1)


def test_an_invalid_uidl_is_named_by_its_digest(connector: Connector) -> None:
    fake = ScriptedPop3(mails=[b"a\r\n", b"b\r\n"], uidls={1: b"u" * 5000, 2: b"fine-1"})
    with session(fake, connector) as mailbox:
        names = [message.uidl for message in mailbox.listing()]
    assert names[0].startswith("~") and len(names[0]) == 65
    assert names[1] == "fine-1"


def test_a_server_that_keeps_challenging_gets_the_clients_cancel(connector: Connector) -> None:
    challenge: Answer = lambda _: b"+ again\r\n"  # noqa: E731
    fake = ScriptedPop3(capa=[b"SASL XOAUTH2"], answers={"AUTH": challenge, "*": challenge})
    with fake.running() as port:
        server = server_at(port, auth_type=AuthType.OAUTH2, oauth_provider="google")
        mailbox = Pop3Mailbox(server, "token-value", connector)
        with pytest.raises(MailServerError) as refused:
            mailbox.open()
    assert refused.value.category == "authentication"
    assert "went on challenging" in refused.value.reason
    assert fake.received[-1] == b"*\r\n"  # the client's cancel
    assert len(fake.received) == 2 + 2 + 1  # CAPA, AUTH, the token, the error reply, cancel


def test_a_server_that_stopped_offering_stls_gets_no_credentials(connector: Connector) -> None:
    fake = ScriptedPop3()
    with fake.running() as port:
        pinned = server_at(port, starttls_seen_at=f"127.0.0.1:{port}")
        mailbox = Pop3Mailbox(pinned, "secret", connector)
        with pytest.raises(MailServerError) as refused:
            mailbox.open()
    assert refused.value.category == "tls"
    assert fake.received == [b"CAPA\r\n"]


def test_a_refusal_is_shown_short_and_printable(connector: Connector) -> None:
    noise = b"-ERR " + b"\x1b[31mred\x07 " * 300 + b"\xff\xfe\r\n"
    fake = ScriptedPop3(answers={"PASS": lambda _: noise})
    with fake.running() as port:
        mailbox = Pop3Mailbox(server_at(port), "secret", connector)
        with pytest.raises(MailServerError) as refused:
            mailbox.open()
    reason = refused.value.reason
    assert reason.startswith("authentication failed: server said \ufffd[31mred\ufffd")
    assert len(reason) <= 250 and reason.isprintable()
    assert "\x1b" not in reason and "secret" not in reason


def test_an_endless_status_line_is_a_protocol_error(connector: Connector) -> None:
    fake = ScriptedPop3(greeting=b"+OK " + b"g" * 100_000 + b"\r\n")
    with fake.running() as port:
        mailbox = Pop3Mailbox(server_at(port), "secret", connector)
        with pytest.raises(MailServerError, match="line longer than 4,095 bytes in its greeting"):
            mailbox.open()


def test_a_line_break_in_a_password_is_never_sent(connector: Connector) -> None:
    fake = ScriptedPop3()
    with fake.running() as port:
        mailbox = Pop3Mailbox(server_at(port), "pw\r\nDELE 1", connector)
        with pytest.raises(MailServerError, match="line break"):
            mailbox.open()
    assert not any(line.startswith((b"PASS", b"DELE")) for line in fake.received)


def test_stat_counts_the_maildrop(connector: Connector) -> None:
    fake = ScriptedPop3(mails=[b"a\r\n", b"bb\r\n"])
    with session(fake, connector) as mailbox:
        assert mailbox.stat() == (2, 7)


def test_a_server_that_sends_data_behind_its_stls_go_ahead_gets_no_credentials(
    connector: Connector,
) -> None:
    """Lines a man in the middle put behind STLS's +OK would pass for lines sent over TLS."""
    fake = ScriptedPop3(
        capa=[b"STLS", b"UIDL"], answers={"STLS": lambda _: b"+OK begin TLS\r\n+OK injected\r\n"}
    )
    with fake.running() as port:
        mailbox = Pop3Mailbox(server_at(port), "secret", connector)
        with pytest.raises(MailServerError, match="sent data behind its STLS"):
            mailbox.open()
    assert fake.received == [b"CAPA\r\n", b"STLS\r\n"]
