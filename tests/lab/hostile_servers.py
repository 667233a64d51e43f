"""Mail servers that misbehave on script: the hostile servers of issue 20, on loopback.

``FakeServer(Protocol.IMAP, Script.DEFLATE_BOMB)`` listens on an ephemeral port of 127.0.0.1,
in threads of the test process, and serves each connection with the protocol's small polite
core (IMAP, POP3 or SMTP: enough of each for Mailroom's adapters to log in, list, fetch, IDLE
and send). The script names the one thing the server does wrong, at the one place where the
core does it:

- ``ENDLESS_GREETING``: the greeting is one line that never ends;
  ``ENDLESS_MULTILINE_GREETING`` (SMTP): ``220-`` lines for ever;
- ``TRICKLE_GREETING``: the greeting comes at one byte a second;
- ``ENDLESS_REPLY``: the answer to the first command never ends (IMAP CAPABILITY: untagged
  lines; POP3 CAPA and SMTP EHLO: multi-line replies without their last line);
- ``ENDLESS_IDLE`` (IMAP): untagged lines for ever once IDLE waits;
- ``HUGE_LITERAL_IN_SELECT`` / ``HUGE_LITERAL_IN_FETCH`` (IMAP): a literal of 10 GB announced;
- ``DEFLATE_BOMB`` (IMAP): after ``COMPRESS DEFLATE``, a deflate stream that inflates without end;
- ``SASL_LOOP``: ``AUTHENTICATE`` / ``AUTH`` answered with another challenge for ever;
- ``NO_STARTTLS``: STARTTLS (STLS) is not offered, and a login in plain text is accepted;
- ``LYING_SIZE`` (IMAP, POP3): RFC822.SIZE / LIST say 100 bytes, the mail has 3 MiB;
- ``ENDLESS_FINAL_REPLY`` / ``TRICKLE_FINAL_REPLY`` (SMTP): the reply to a mail's final ``.``
  never ends, or comes at one byte a second.

A flood of lines sends lines of ``flood_line`` bytes (64 by default, as real servers' lines
are; 0 for the shortest, which make a client library build the most objects per megabyte).
``security`` adds TLS with the lab's certificate for ``localhost``/127.0.0.1
(``tests.lab.certs``): ``IMPLICIT`` from the first byte, ``STARTTLS`` offered (STLS for POP3).
Everything a client sends is recorded, after TLS and inflating, in a file per connection
(``received()``): a test proves that a password never reached a server, and the recording costs
the test process no memory that a measurement of the client would count. ``stop()`` cuts every
connection, which frees a client that would otherwise read for ever.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import ssl
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, ClassVar, NoReturn

from tests.lab.certs import LabCertificates

HOST = "127.0.0.1"
ONE_BYTE_EVERY = 1.0  # seconds: a trickling server's pace
HUGE_LITERAL = 10_000_000_000
LIED_SIZE = 100
TRUE_SIZE = 3 * 1024 * 1024
_BLOCK = 64 * 1024  # bytes a flood writes at once
FLOOD_LINE = 64  # bytes per line of a flood of lines, by default (as real servers' lines)


class Protocol(StrEnum):
    IMAP = "imap"
    POP3 = "pop3"
    SMTP = "smtp"


class Security(StrEnum):
    PLAIN = "plain"  # no TLS offered
    STARTTLS = "starttls"  # STARTTLS (IMAP, SMTP) or STLS (POP3) offered
    IMPLICIT = "implicit"  # TLS from the first byte


class Script(StrEnum):
    """What a fake server does wrong (module doc); ``POLITE`` is the control."""

    POLITE = "polite"
    ENDLESS_GREETING = "endless greeting"
    ENDLESS_MULTILINE_GREETING = "endless multi-line greeting"
    TRICKLE_GREETING = "greeting at one byte a second"
    ENDLESS_REPLY = "endless reply"
    ENDLESS_IDLE = "endless lines in IDLE"
    HUGE_LITERAL_IN_SELECT = "huge literal in SELECT"
    HUGE_LITERAL_IN_FETCH = "huge literal in FETCH"
    DEFLATE_BOMB = "deflate bomb"
    SASL_LOOP = "endless SASL challenges"
    NO_STARTTLS = "no STARTTLS"
    LYING_SIZE = "lying size"
    ENDLESS_FINAL_REPLY = "endless reply to the mail"
    TRICKLE_FINAL_REPLY = "reply to the mail at one byte a second"


def sample_mail(number: int = 1, size: int = 0) -> bytes:
    """A small mail; with ``size``, padded with lines of ``x`` to about that many bytes
    (never a line starting with a dot, and always ending in CRLF)."""
    mail = (
        f"From: someone@example.org\r\nTo: inbox@lab.test\r\nSubject: mail {number}\r\n"
        f"Message-ID: <{number}@hostile.lab.test>\r\n\r\nHello, this is mail {number}.\r\n"
    ).encode()
    return mail + (b"x" * 998 + b"\r\n") * max(0, (size - len(mail)) // 1000)


class ClientGone(Exception):
    """The client hung up (or the server is stopping): the conversation is over."""


class Conversation:
    """The server's side of one connection: lines in (recorded), bytes out, TLS, deflate."""

    def __init__(self, sock: socket.socket, record: BinaryIO, stopping: threading.Event) -> None:
        self.sock = sock
        self.secure = isinstance(sock, ssl.SSLSocket)
        self._record = record
        self._stopping = stopping
        self._buffer = bytearray()
        self._inflater: zlib._Decompress | None = None
        self._compressor: zlib._Compress | None = None

    # --- reading ---------------------------------------------------------------------------

    def line(self) -> bytes:
        """The client's next line, without its line end."""
        while (end := self._buffer.find(b"\n")) < 0:
            self._receive()
        line = bytes(self._buffer[: end + 1])
        del self._buffer[: end + 1]
        return line.rstrip(b"\r\n")

    def wait_for_hang_up(self) -> NoReturn:
        """Say nothing more; record what the client still sends until it hangs up."""
        while True:
            self._receive()

    def _receive(self) -> None:
        data = self.sock.recv(_BLOCK)
        if not data:
            raise ClientGone
        if self._inflater is not None:
            data = self._inflater.decompress(data)
        self._record.write(data)
        self._buffer += data

    # --- writing ---------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self._compressor is not None:
            data = self._compressor.compress(data) + self._compressor.flush(zlib.Z_SYNC_FLUSH)
        self.sock.sendall(data)

    def say(self, *lines: str) -> None:
        self.send("".join(f"{line}\r\n" for line in lines).encode())

    def flood(self, unit: bytes) -> NoReturn:
        """``unit`` again and again, until the client hangs up."""
        block = unit * max(1, _BLOCK // len(unit))
        while not self._stopping.is_set():
            self.send(block)
        raise ClientGone

    def trickle(self, data: bytes) -> None:
        """``data`` one byte at a time, ``ONE_BYTE_EVERY`` seconds apart."""
        for byte in data:
            self.send(bytes([byte]))
            if self._stopping.wait(ONE_BYTE_EVERY):
                raise ClientGone

    # --- changing the channel ----------------------------------------------------------------

    def start_tls(self, context: ssl.SSLContext) -> None:
        self.sock = context.wrap_socket(self.sock, server_side=True)
        self.secure = True

    def compress(self) -> None:
        """RFC 4978: raw deflate both ways from now on, each write sync-flushed."""
        self._inflater = zlib.decompressobj(-15)
        self._compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
        if self._buffer:  # what came behind COMPRESS was compressed already
            early, self._buffer = bytes(self._buffer), bytearray()
            self._buffer += self._inflater.decompress(early)

    def cut(self) -> None:
        """Ends the connection under a thread blocked on it (the socket's own shutdown, also
        under TLS: ``SSLSocket.shutdown`` would drop the TLS object another thread uses)."""
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)


class Session:
    """One connection, served by a protocol's polite core; the script misbehaves in it."""

    protocol: ClassVar[Protocol]
    scripts: ClassVar[frozenset[Script]]  # the scripts this protocol knows

    def __init__(
        self,
        talk: Conversation,
        script: Script,
        security: Security,
        tls: ssl.SSLContext | None,
        mails: list[bytes],
        flood_line: int,
    ) -> None:
        self.talk = talk
        self.script = script
        self.security = security
        self.tls = tls
        self.mails = mails
        self.flood_line = flood_line

    def serve(self) -> None:
        raise NotImplementedError

    @property
    def offers_starttls(self) -> bool:
        return (
            self.security is Security.STARTTLS
            and not self.talk.secure
            and self.script is not Script.NO_STARTTLS
        )

    def start_tls(self) -> None:
        assert self.tls is not None
        self.talk.start_tls(self.tls)

    def flood_lines(self, prefix: bytes) -> NoReturn:
        """Lines of ``flood_line`` bytes for ever: ``prefix``, at least two ``x`` (one would let
        a library keep CPython's cached one-byte string instead of a new object) and CRLF."""
        self.talk.flood(prefix + b"x" * max(2, self.flood_line - len(prefix) - 2) + b"\r\n")

    def size_of(self, mail: bytes) -> int:
        """The size the server tells (a lie with ``LYING_SIZE``)."""
        return LIED_SIZE if self.script is Script.LYING_SIZE else len(mail)

    def greet(self, greeting: str, endless: bytes) -> None:
        """The greeting as the script has it: polite, one endless line, or trickled."""
        if self.script is Script.ENDLESS_GREETING:
            self.talk.send(endless)
            self.talk.flood(b"flood ")
        line = f"{greeting}\r\n".encode()
        if self.script is Script.TRICKLE_GREETING:
            self.talk.trickle(line)
        else:
            self.talk.send(line)


# --- IMAP --------------------------------------------------------------------------------------


class ImapSession(Session):
    """IMAP4rev1 for one INBOX of ``mails`` (UIDs 1..n); AUTH=PLAIN, LOGIN, IDLE, COMPRESS."""

    protocol = Protocol.IMAP
    scripts = frozenset(
        {
            Script.POLITE,
            Script.ENDLESS_GREETING,
            Script.TRICKLE_GREETING,
            Script.ENDLESS_REPLY,
            Script.ENDLESS_IDLE,
            Script.HUGE_LITERAL_IN_SELECT,
            Script.HUGE_LITERAL_IN_FETCH,
            Script.DEFLATE_BOMB,
            Script.SASL_LOOP,
            Script.NO_STARTTLS,
            Script.LYING_SIZE,
        }
    )
    logged_in = False
    compressed = False

    def serve(self) -> None:
        self.greet("* OK fake IMAP server ready", b"* OK ")
        while True:
            tag, _, rest = self.talk.line().decode("utf-8", "replace").partition(" ")
            verb, _, args = rest.partition(" ")
            if verb.upper() == "UID":
                verb, _, args = args.partition(" ")
            handler = getattr(self, f"do_{verb.upper()}", None)
            if handler is None:
                self.talk.say(f"{tag} BAD unknown command")
            else:
                handler(tag, args)

    def capabilities(self) -> str:
        names = ["IMAP4rev1", "AUTH=PLAIN", "AUTH=XOAUTH2", "IDLE"]
        if self.offers_starttls:
            names.append("STARTTLS")
        if self.logged_in and not self.compressed:
            names.append("COMPRESS=DEFLATE")
        return " ".join(names)

    def do_CAPABILITY(self, tag: str, args: str) -> None:
        if self.script is Script.ENDLESS_REPLY:
            self.flood_lines(b"* OK ")
        self.talk.say(f"* CAPABILITY {self.capabilities()}", f"{tag} OK CAPABILITY done")

    def do_STARTTLS(self, tag: str, args: str) -> None:
        self.talk.say(f"{tag} OK begin TLS")
        self.start_tls()

    def do_LOGIN(self, tag: str, args: str) -> None:
        self.logged_in = True
        self.talk.say(f"{tag} OK logged in")

    def do_AUTHENTICATE(self, tag: str, args: str) -> None:
        while self.script is Script.SASL_LOOP:
            self.talk.say("+ ")
            self.talk.line()
        if len(args.split()) < 2:  # no initial response: ask for it
            self.talk.say("+ ")
            self.talk.line()
        self.logged_in = True
        self.talk.say(f"{tag} OK logged in")

    def do_COMPRESS(self, tag: str, args: str) -> None:
        self.talk.say(f"{tag} OK DEFLATE active")
        self.talk.compress()
        self.compressed = True
        if self.script is Script.DEFLATE_BOMB:
            self.flood_lines(b"* OK ")

    def do_SELECT(self, tag: str, args: str) -> None:
        if self.script is Script.HUGE_LITERAL_IN_SELECT:
            self.talk.send(f"* FLAGS {{{HUGE_LITERAL}}}\r\n".encode())
            self.talk.wait_for_hang_up()
        count = len(self.mails)
        self.talk.say(
            f"* {count} EXISTS",
            "* 0 RECENT",
            "* FLAGS (\\Seen \\Flagged)",
            "* OK [UIDVALIDITY 1] UIDs valid",
            f"* OK [UIDNEXT {count + 1}] next UID",
            f"{tag} OK [READ-WRITE] selected",
        )

    do_EXAMINE = do_SELECT

    def do_SEARCH(self, tag: str, args: str) -> None:
        uids = " ".join(str(uid) for uid in self._uids(args.rsplit(maxsplit=1)[-1]))
        self.talk.say(f"* SEARCH {uids}".rstrip(), f"{tag} OK searched")

    def do_FETCH(self, tag: str, args: str) -> None:
        uid_set, _, items = args.partition(" ")
        for uid in self._uids(uid_set):
            mail = self.mails[uid - 1]
            if "RFC822.SIZE" in items:
                self.talk.say(f"* {uid} FETCH (UID {uid} RFC822.SIZE {self.size_of(mail)})")
            if "BODY.PEEK[HEADER]" in items:
                self._literal(uid, "BODY[HEADER]", mail.split(b"\r\n\r\n")[0] + b"\r\n\r\n")
            elif "BODY.PEEK[]" in items:
                if self.script is Script.HUGE_LITERAL_IN_FETCH:
                    self.talk.send(
                        f"* {uid} FETCH (UID {uid} BODY[] {{{HUGE_LITERAL}}}\r\n".encode()
                    )
                    self.talk.wait_for_hang_up()
                self._literal(uid, "BODY[]", mail)
        self.talk.say(f"{tag} OK fetched")

    def do_STORE(self, tag: str, args: str) -> None:
        self.talk.say(f"{tag} OK stored")

    def do_IDLE(self, tag: str, args: str) -> None:
        self.talk.say("+ idling")
        if self.script is Script.ENDLESS_IDLE:
            time.sleep(0.2)  # the client is waiting for news by now
            self.flood_lines(b"* OK ")
        while self.talk.line().upper() != b"DONE":
            pass
        self.talk.say(f"{tag} OK IDLE done")

    def do_NOOP(self, tag: str, args: str) -> None:
        self.talk.say(f"{tag} OK")

    def do_LOGOUT(self, tag: str, args: str) -> None:
        self.talk.say("* BYE", f"{tag} OK bye")
        raise ClientGone

    def _literal(self, uid: int, item: str, data: bytes) -> None:
        self.talk.send(f"* {uid} FETCH (UID {uid} {item} {{{len(data)}}}\r\n".encode())
        self.talk.send(data)
        self.talk.send(b")\r\n")

    def _uids(self, uid_set: str) -> list[int]:
        """The UIDs of existing mails in an IMAP sequence set (``1``, ``2:*``, ``1,3``)."""
        found: list[int] = []
        last = len(self.mails)
        for part in uid_set.split(","):
            low, _, high = part.partition(":")
            first = last if low == "*" else int(low)
            final = first if not high else (last if high == "*" else int(high))
            found += [u for u in range(min(first, final), max(first, final) + 1) if u <= last]
        return found


# --- POP3 --------------------------------------------------------------------------------------


class Pop3Session(Session):
    """POP3 for one maildrop of ``mails``: USER/PASS, AUTH (SASL), CAPA, STLS, UIDL, TOP."""

    protocol = Protocol.POP3
    scripts = frozenset(
        {
            Script.POLITE,
            Script.ENDLESS_GREETING,
            Script.TRICKLE_GREETING,
            Script.ENDLESS_REPLY,
            Script.SASL_LOOP,
            Script.NO_STARTTLS,
            Script.LYING_SIZE,
        }
    )

    def serve(self) -> None:
        self.greet("+OK fake POP3 server ready", b"+OK ")
        while True:
            verb, _, args = self.talk.line().decode("utf-8", "replace").partition(" ")
            handler = getattr(self, f"do_{verb.upper()}", None)
            if handler is None:
                self.talk.say("-ERR unknown command")
            else:
                handler(args)

    def do_CAPA(self, args: str) -> None:
        if self.script is Script.ENDLESS_REPLY:
            self.talk.say("+OK capabilities follow")
            self.flood_lines(b"X-")
        names = ["USER", "UIDL", "TOP", "SASL PLAIN XOAUTH2 OAUTHBEARER"]
        if self.offers_starttls:
            names.append("STLS")
        self.talk.say("+OK capabilities follow", *names, ".")

    def do_STLS(self, args: str) -> None:
        self.talk.say("+OK begin TLS")
        self.start_tls()

    def do_USER(self, args: str) -> None:
        self.talk.say("+OK send PASS")

    def do_PASS(self, args: str) -> None:
        self.talk.say("+OK logged in")

    def do_AUTH(self, args: str) -> None:
        self.talk.say("+ ")
        self.talk.line()
        while self.script is Script.SASL_LOOP:
            self.talk.say("+ ")
            self.talk.line()
        self.talk.say("+OK logged in")

    def do_STAT(self, args: str) -> None:
        total = sum(self.size_of(mail) for mail in self.mails)
        self.talk.say(f"+OK {len(self.mails)} {total}")

    def do_LIST(self, args: str) -> None:
        sizes = [f"{n} {self.size_of(mail)}" for n, mail in enumerate(self.mails, 1)]
        self.talk.say("+OK listing follows", *sizes, ".")

    def do_UIDL(self, args: str) -> None:
        self.talk.say("+OK", *(f"{n} uid-{n}" for n in range(1, len(self.mails) + 1)), ".")

    def do_RETR(self, args: str) -> None:
        self._multiline(self.mails[int(args) - 1])

    def do_TOP(self, args: str) -> None:
        mail = self.mails[int(args.split(maxsplit=1)[0]) - 1]
        self._multiline(mail.split(b"\r\n\r\n")[0] + b"\r\n\r\n")

    def do_DELE(self, args: str) -> None:
        self.talk.say("+OK deleted")

    def do_NOOP(self, args: str) -> None:
        self.talk.say("+OK")

    def do_RSET(self, args: str) -> None:
        self.talk.say("+OK")

    def do_QUIT(self, args: str) -> None:
        self.talk.say("+OK bye")
        raise ClientGone

    def _multiline(self, data: bytes) -> None:
        """A mail as RETR and TOP send it: dot-stuffed, ended by a line with a dot (the lab's
        mails end in CRLF)."""
        self.talk.send(b"+OK message follows\r\n")
        self.talk.send(data.replace(b"\r\n.", b"\r\n..") if b"\r\n." in data else data)
        self.talk.send(b".\r\n")


# --- SMTP --------------------------------------------------------------------------------------


class SmtpSession(Session):
    """ESMTP submission: EHLO, STARTTLS, AUTH PLAIN/LOGIN/XOAUTH2, PIPELINING, DATA."""

    protocol = Protocol.SMTP
    scripts = frozenset(
        {
            Script.POLITE,
            Script.ENDLESS_GREETING,
            Script.ENDLESS_MULTILINE_GREETING,
            Script.TRICKLE_GREETING,
            Script.ENDLESS_REPLY,
            Script.SASL_LOOP,
            Script.NO_STARTTLS,
            Script.ENDLESS_FINAL_REPLY,
            Script.TRICKLE_FINAL_REPLY,
        }
    )

    def serve(self) -> None:
        if self.script is Script.ENDLESS_MULTILINE_GREETING:
            self.flood_lines(b"220-")
        self.greet("220 fake.lab.test ESMTP ready", b"220 ")
        while True:
            verb, _, args = self.talk.line().decode("utf-8", "replace").partition(" ")
            handler = getattr(self, f"do_{verb.upper()}", None)
            if handler is None:
                self.talk.say("500 5.5.2 unknown command")
            else:
                handler(args)

    def do_EHLO(self, args: str) -> None:
        if self.script is Script.ENDLESS_REPLY:
            self.flood_lines(b"250-")
        names = ["PIPELINING", "SIZE 52428800", "8BITMIME", "AUTH PLAIN LOGIN XOAUTH2"]
        if self.offers_starttls:
            names.append("STARTTLS")
        lines = ["fake.lab.test", *names, "SMTPUTF8"]
        self.talk.say(*(f"250-{line}" for line in lines[:-1]), f"250 {lines[-1]}")

    def do_HELO(self, args: str) -> None:
        self.talk.say("250 fake.lab.test")

    def do_STARTTLS(self, args: str) -> None:
        self.talk.say("220 2.0.0 begin TLS")
        self.start_tls()

    def do_AUTH(self, args: str) -> None:
        while self.script is Script.SASL_LOOP:
            self.talk.say("334 ")
            self.talk.line()
        mechanism, _, initial = args.partition(" ")
        if mechanism.upper() == "LOGIN":
            self.talk.say("334 " + base64.b64encode(b"Username:").decode())
            self.talk.line()
            self.talk.say("334 " + base64.b64encode(b"Password:").decode())
            self.talk.line()
        elif not initial:
            self.talk.say("334 ")
            self.talk.line()
        self.talk.say("235 2.7.0 authenticated")

    def do_MAIL(self, args: str) -> None:
        self.talk.say("250 2.1.0 OK")

    def do_RCPT(self, args: str) -> None:
        self.talk.say("250 2.1.5 OK")

    def do_DATA(self, args: str) -> None:
        self.talk.say("354 end with <CRLF>.<CRLF>")
        while self.talk.line() != b".":
            pass
        if self.script is Script.ENDLESS_FINAL_REPLY:
            self.flood_lines(b"250-")
        if self.script is Script.TRICKLE_FINAL_REPLY:
            self.talk.trickle(b"250 2.0.0 queued\r\n")
        else:
            self.talk.say("250 2.0.0 queued")

    def do_NOOP(self, args: str) -> None:
        self.talk.say("250 2.0.0 OK")

    def do_RSET(self, args: str) -> None:
        self.talk.say("250 2.0.0 OK")

    def do_QUIT(self, args: str) -> None:
        self.talk.say("221 2.0.0 bye")
        raise ClientGone


SESSIONS: dict[Protocol, type[Session]] = {
    Protocol.IMAP: ImapSession,
    Protocol.POP3: Pop3Session,
    Protocol.SMTP: SmtpSession,
}


# --- the server --------------------------------------------------------------------------------


class FakeServer:
    """A misbehaving mail server on 127.0.0.1:``port`` (module doc); a context manager."""

    def __init__(
        self,
        protocol: Protocol,
        script: Script = Script.POLITE,
        *,
        security: Security = Security.PLAIN,
        certs: LabCertificates | None = None,
        mails: list[bytes] | None = None,
        directory: Path | None = None,
        flood_line: int = FLOOD_LINE,
    ) -> None:
        """``mails``: the mailbox (one small mail by default); ``directory``: where the
        recordings go (a new one in the system's temporary directory by default);
        ``flood_line``: the length of a flood's lines (0: the shortest, the most lines a
        megabyte can hold)."""
        self.session = SESSIONS[protocol]
        if script not in self.session.scripts:
            raise ValueError(f"a fake {protocol} server cannot play {script!r}")
        if security is not Security.PLAIN and certs is None:
            raise ValueError("TLS needs the lab's certificates")
        self.protocol = protocol
        self.script = script
        self.security = security
        if mails is None:  # built now, not while a client's memory is measured
            mails = [sample_mail(1, TRUE_SIZE if script is Script.LYING_SIZE else 0)]
        self.mails = mails
        self.flood_line = flood_line
        self._tls: ssl.SSLContext | None = None
        if certs is not None:
            self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._tls.load_cert_chain(certs.localhost.cert, certs.localhost.key)
        self.directory = directory or Path(tempfile.mkdtemp(prefix=f"mailroom-fake-{protocol}-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self._records: list[Path] = []
        self._conversations: list[Conversation] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener = socket.create_server((HOST, 0))
        self.port: int = self._listener.getsockname()[1]

    def __enter__(self) -> FakeServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<fake {self.protocol} server on {HOST}:{self.port}: {self.script}>"

    @property
    def implicit_tls(self) -> bool:
        return self.security is Security.IMPLICIT

    def start(self) -> None:
        self._spawn(self._accept)

    def stop(self) -> None:
        """Stops listening and cuts every connection; returns once every thread has ended.
        What clients sent stays readable (``received``)."""
        self._stopping.set()
        with contextlib.suppress(OSError):  # wakes the accept() blocked in its thread
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            conversations = list(self._conversations)
        for talk in conversations:
            talk.cut()
        for thread in list(self._threads):
            thread.join(5)
        for talk in conversations:
            talk.sock.close()

    def received(self) -> bytes:
        """Everything clients sent, one connection after the other."""
        with self._lock:
            records = list(self._records)
        return b"".join(path.read_bytes() for path in records if path.exists())

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._records)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name=repr(self))
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            self._spawn(self._converse, sock)

    def _converse(self, sock: socket.socket) -> None:
        with self._lock:
            record = self.directory / f"connection-{len(self._records) + 1}.bin"
            self._records.append(record)
        with record.open("wb", buffering=0) as recording:
            talk = Conversation(sock, recording, self._stopping)
            with self._lock:
                self._conversations.append(talk)
            try:
                if self.implicit_tls:
                    assert self._tls is not None
                    talk.start_tls(self._tls)
                session = self.session(
                    talk, self.script, self.security, self._tls, self.mails, self.flood_line
                )
                session.serve()
            except (ClientGone, OSError, ValueError):
                pass  # the client hung up or gave up, or sent what the fake cannot parse
            finally:
                talk.sock.close()
