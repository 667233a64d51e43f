"""A mail server that lets anyone log in without TLS and records every byte it receives.

It stands for the host a hostile admin points a server at: it speaks just enough SMTP, IMAP or
POP3 for a client to log in in plain text (it offers AUTH PLAIN and LOGIN, and XOAUTH2 and
OAUTHBEARER for access tokens, never STARTTLS or STLS) and accepts whatever credentials come.
A test then asks whether a secret reached it, in any spelling a login uses: as typed, in a
SASL response (base64), or inside a longer base64 string.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
import socket
import threading
from collections.abc import Callable, Iterator
from types import TracebackType

from tests.support.tcp import closed_port

_BASE64_RUN = re.compile(rb"[A-Za-z0-9+/]{4,}={0,2}")
_LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n$")
_IMAP_CAPABILITIES = "IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 AUTH=OAUTHBEARER IDLE"


class _Client:
    """One connection: reads lines (and IMAP literals), records them, writes answers."""

    def __init__(self, sock: socket.socket, record: Callable[[bytes], None]) -> None:
        self.sock = sock
        self._record = record
        self._buffer = b""

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode())

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError
        self._record(chunk)
        self._buffer += chunk

    def line(self) -> bytes:
        while b"\n" not in self._buffer:
            self._fill()
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line + b"\n"

    def exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            self._fill()
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def command(self, continuation: str = "+ go ahead\r\n") -> bytes:
        """A line with its IMAP literals ({n} or {n+}) read in."""
        line = self.line()
        while match := _LITERAL.search(line):
            if not line.rstrip().endswith(b"+}"):
                self.send(continuation)
            line += self.exactly(int(match.group(1))) + self.line()
        return line


def _smtp(client: _Client) -> None:
    client.send("220 recorder.test ESMTP\r\n")
    while True:
        words = client.line().strip().split()
        verb = words[0].upper().decode(errors="replace") if words else ""
        if verb in ("EHLO", "HELO"):
            client.send(
                "250-recorder.test\r\n250-AUTH PLAIN LOGIN XOAUTH2 OAUTHBEARER\r\n250 8BITMIME\r\n"
            )
        elif verb == "AUTH":
            mechanism = words[1].upper() if len(words) > 1 else b""
            if mechanism == b"LOGIN":
                if len(words) < 3:
                    client.send("334 VXNlcm5hbWU6\r\n")
                    client.line()
                client.send("334 UGFzc3dvcmQ6\r\n")
                client.line()
            elif len(words) < 3:
                client.send("334 \r\n")
                client.line()
            client.send("235 2.7.0 welcome\r\n")
        elif verb == "DATA":
            client.send("354 go on\r\n")
            while client.line() not in (b".\r\n", b".\n"):
                pass
            client.send("250 2.0.0 taken\r\n")
        elif verb == "QUIT":
            client.send("221 2.0.0 bye\r\n")
            return
        else:
            client.send("250 2.0.0 ok\r\n")


def _imap(client: _Client) -> None:
    client.send(f"* OK [CAPABILITY {_IMAP_CAPABILITIES}] recorder ready\r\n")
    while True:
        words = client.command().strip().split(maxsplit=2)
        if len(words) < 2:
            client.send("* BAD what\r\n")
            continue
        tag, verb = words[0].decode(errors="replace"), words[1].upper().decode(errors="replace")
        if verb == "CAPABILITY":
            client.send(f"* CAPABILITY {_IMAP_CAPABILITIES}\r\n")
        elif verb == "AUTHENTICATE" and len(words[2:] and words[2].split()) < 2:
            client.send("+ \r\n")  # no initial response: ask for it
            client.line()
        elif verb in ("SELECT", "EXAMINE"):
            client.send("* 0 EXISTS\r\n* OK [UIDVALIDITY 1] ok\r\n* OK [UIDNEXT 1] ok\r\n")
        elif verb == "LOGOUT":
            client.send(f"* BYE\r\n{tag} OK bye\r\n")
            return
        client.send(f"{tag} OK done\r\n")


def _pop3(client: _Client) -> None:
    client.send("+OK recorder ready\r\n")
    while True:
        words = client.line().strip().split()
        verb = words[0].upper().decode(errors="replace") if words else ""
        if verb == "CAPA":
            client.send("+OK\r\nUSER\r\nSASL PLAIN XOAUTH2 OAUTHBEARER\r\nUIDL\r\n.\r\n")
        elif verb == "AUTH" and len(words) == 2:
            client.send("+ \r\n")
            client.line()
            client.send("+OK welcome\r\n")
        elif verb == "STAT":
            client.send("+OK 0 0\r\n")
        elif verb == "QUIT":
            client.send("+OK bye\r\n")
            return
        else:
            client.send("+OK\r\n")


_PROTOCOLS: dict[str, Callable[[_Client], None]] = {"smtp": _smtp, "imap": _imap, "pop3": _pop3}


class RecordingServer:
    """A plain-text ``protocol`` server on 127.0.0.1 (``port``: a free one unless given)."""

    def __init__(self, protocol: str, port: int | None = None) -> None:
        self.protocol = protocol
        self.port = port or closed_port()
        self.connections = 0
        self._received = bytearray()
        self._lock = threading.Lock()
        self._server: socket.socket | None = None

    def __enter__(self) -> RecordingServer:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def received(self) -> bytes:
        with self._lock:
            return bytes(self._received)

    def start(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(16)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)
            self._server.close()
            self._server = None

    def saw(self, secret: str) -> bool:
        """Whether ``secret`` reached this server in any spelling a login uses."""
        plain = secret.encode()
        if plain in b"".join(self.readable_forms()):
            return True
        data = self.received
        for offset in range(3):  # base64 of the secret inside a longer base64 text
            encoded = base64.b64encode(b"\0" * offset + plain)
            core = encoded[4 if offset else 0 : -4]
            if len(core) >= 4 and core in data:
                return True
        return False

    def readable_forms(self) -> Iterator[bytes]:
        """What was received: as it came, and every base64 run in it decoded."""
        data = self.received
        yield data
        for run in _BASE64_RUN.findall(data):
            for padded in (run, run + b"=" * (-len(run) % 4)):
                with contextlib.suppress(binascii.Error, ValueError):
                    yield b"\0" + base64.b64decode(padded, validate=True) + b"\0"

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                sock, _ = server.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        with sock, contextlib.suppress(OSError, EOFError):
            sock.settimeout(30)
            _PROTOCOLS[self.protocol](_Client(sock, self._record))

    def _record(self, data: bytes) -> None:
        with self._lock:
            self._received += data
