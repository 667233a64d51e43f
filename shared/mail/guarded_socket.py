"""Sockets that bound what a mail server can make Mailroom read: bytes and time per answer.

A mail server is whatever a tenant admin names, and may be hostile: a greeting that never ends,
one byte a second, a literal of ten gigabytes, a deflate bomb. imaplib, smtplib and our POP3
client read through ``sock.makefile("rb")``; the sockets here hand them a
:class:`GuardedReader` instead, which counts every byte the server sends in answer to one
command (everything read between two writes of ours) and the time since its first byte. An
answer over its limit raises :class:`AnswerTooLarge`, a ``MailServerError`` that names the
limit and the command ("server sent more than 1 MiB in its greeting"). Waiting for a silent
server is bounded by the socket's own timeout.

Adapters widen the limit around a command whose answer is known to be large (a FETCH of
checked mail sizes) with :meth:`ReadGuard.allowing`. TLS keeps the guard:
:class:`GuardedSSLSocket` is the ``sslsocket_class`` of Mailroom's TLS contexts, and
:func:`shared.mail.tls.TlsConnector` hands a plain socket's guard on to its TLS successor.
"""

from __future__ import annotations

import socket
import ssl
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from shared.contracts.status_reports import FailureCategory
from shared.mail.errors import MailServerError

_RECV_BYTES = 65536
# Verbs named in a reason; anything else (a SASL response, a literal) is "its answer".
_VERBS = frozenset(
    [
        "EHLO",
        "HELO",
        "MAIL",
        "RCPT",
        "DATA",
        "STARTTLS",
        "AUTH",
        "NOOP",
        "RSET",
        "QUIT",
        "CAPA",
        "STLS",
        "USER",
        "PASS",
        "STAT",
        "LIST",
        "UIDL",
        "RETR",
        "TOP",
        "DELE",
        "CAPABILITY",
        "LOGIN",
        "AUTHENTICATE",
        "SELECT",
        "EXAMINE",
        "FETCH",
        "SEARCH",
        "STORE",
        "IDLE",
        "DONE",
        "COMPRESS",
        "LOGOUT",
        "ENABLE",
        "ID",
        "NAMESPACE",
    ]
)


def mebibytes(count: int) -> str:
    return f"{count / 1048576:g} MiB" if count >= 1048576 else f"{count / 1024:g} KiB"


class AnswerTooLarge(MailServerError):
    """The server sent more, or for longer, than one answer may take; the connection is
    unusable afterwards (the answer was cut off)."""

    def __init__(self, reason: str) -> None:
        super().__init__(FailureCategory.PROTOCOL, reason)


@dataclass(frozen=True)
class AnswerLimits:
    """What one answer of a mail server may cost by default."""

    max_bytes: int = 1024 * 1024
    # Lines a library reads into objects it keeps (smtplib's reply, imapclient's IDLE news):
    # a megabyte of one-byte lines would cost tens of megabytes of them.
    max_lines: int = 10_000
    max_seconds: float = 30.0
    # A widened answer gets this much more time per byte allowed: a slow but honest link
    # still delivers a large FETCH.
    min_bytes_per_second: int = 64 * 1024


class ReadGuard:
    """The budget of the answer being read; a write of ours starts the next answer."""

    def __init__(self, limits: AnswerLimits) -> None:
        self.limits = limits
        self._max_bytes = limits.max_bytes
        self._max_lines = limits.max_lines
        self._max_seconds = limits.max_seconds
        self._what = "its greeting"
        self._used = 0
        self._lines = 0
        self._first_byte_at: float | None = None
        self.broken: str | None = None  # why an answer was cut off: out of step for good

    def expecting(self, command: bytes) -> None:
        """A command is written: its answer starts with a fresh budget."""
        self._what = f"its answer to {verb}" if (verb := _verb(command)) else "its answer"
        self.restart()

    def restart(self) -> None:
        """A fresh budget for what follows (IDLE: each wait for news is an answer of its own)."""
        self._used = 0
        self._lines = 0
        self._first_byte_at = None

    @contextmanager
    def allowing(self, max_bytes: int) -> Iterator[None]:
        """Answers read inside the block may be up to ``max_bytes`` (and take longer)."""
        saved = self._max_bytes, self._max_lines, self._max_seconds
        self._max_bytes = max(max_bytes, self.limits.max_bytes)
        self._max_lines = max(self.limits.max_lines, max_bytes // 1024)
        self._max_seconds = self.limits.max_seconds + max_bytes / self.limits.min_bytes_per_second
        try:
            yield
        finally:
            self._max_bytes, self._max_lines, self._max_seconds = saved

    def announced(self, size: int) -> None:
        """The server announced ``size`` bytes to come (an IMAP literal): refused before
        anything is read or allocated when it would pass the limit."""
        if self._used + size > self._max_bytes:
            self._cut(
                f"server announced {size} bytes in {self._what}, more than the "
                f"{mebibytes(self._max_bytes)} allowed"
            )

    def line_read(self, line: bytes, size: int) -> None:
        """A library read a line of at most ``size`` bytes (``size - 1`` and its line end)."""
        self._lines += 1
        if self._lines > self._max_lines:
            self._cut(f"server sent more than {self._max_lines:,} lines in {self._what}")
        if 0 < size <= len(line) and not line.endswith(b"\n"):
            self._cut(f"server sent a line longer than {size - 1:,} bytes in {self._what}")

    def received(self, count: int) -> None:
        now = time.monotonic()
        if self._first_byte_at is None:
            self._first_byte_at = now
        self._used += count
        if self._used > self._max_bytes:
            self._cut(f"server sent more than {mebibytes(self._max_bytes)} in {self._what}")
        if now - self._first_byte_at > self._max_seconds:
            self._cut(f"server took more than {self._max_seconds:g} s to send {self._what}")

    def _cut(self, reason: str) -> None:
        self.broken = reason
        raise AnswerTooLarge(reason)

    def abandon(self, reason: str) -> None:
        """The client gave up in the middle of an exchange (a SASL login that went on too
        long): the connection is out of step, as after a cut."""
        self.broken = reason

    def writable(self) -> None:
        """Refuses to write on a connection whose answer was cut off: its next reply would be
        the rest of the flood (a goodbye like LOGOUT or QUIT included)."""
        if self.broken is not None:
            raise AnswerTooLarge(self.broken)


def _verb(command: bytes) -> str | None:
    """The command's verb (``UID FETCH`` for IMAP's ``a1 UID FETCH …``); never an argument."""
    words = command[:64].split(None, 3)
    for index, word in enumerate(words[:2]):
        name = word.decode("ascii", "replace").upper()
        if name == "UID" and index + 1 < len(words):
            following = words[index + 1].decode("ascii", "replace").upper()
            return f"UID {following}" if following in _VERBS else None
        if name in _VERBS:
            return name
    return None


class GuardedReader:
    """The file a library reads a guarded socket through (``read``, ``readline``).

    Received bytes wait in one buffer from a read position on; the read part is dropped once
    it is most of the buffer, so a chunk of many short lines is not moved once per line.
    """

    def __init__(self, sock: GuardedSocket | GuardedSSLSocket) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self._position = 0
        self._inflater: Any = None  # zlib decompressobj once COMPRESS=DEFLATE is on
        self.closed = False

    @property
    def guard(self) -> ReadGuard:
        return self._sock.guard

    @property
    def pending(self) -> bool:
        """Bytes received but not read yet: a poll of the socket would not show them."""
        if self._available or (self._inflater is not None and self._inflater.unconsumed_tail):
            return True
        return isinstance(self._sock, ssl.SSLSocket) and self._sock.pending() > 0

    @property
    def _available(self) -> int:
        return len(self._buffer) - self._position

    def inflate(self) -> None:
        """From now on the server's bytes are a raw deflate stream (RFC 4978); whatever came
        already behind the server's go-ahead is compressed too."""
        self._inflater = zlib.decompressobj(-15)
        early = self._take(self._available)
        if early:
            self._buffer += self._inflater.decompress(early, _RECV_BYTES)

    def readline(self, size: int = -1) -> bytes:
        """A line as a library reads it: one that passes ``size`` without its end is cut off
        with a reason (instead of the library's own "line too long", or a made-up refusal
        such as smtplib's "500 Line too long"), and the lines of one answer are counted."""
        line = self.read_piece(size)
        self.guard.line_read(line, size)
        return line

    def read_piece(self, size: int = -1) -> bytes:
        """Up to the next line end, or ``size`` bytes of a longer line (a mail's lines may be
        of any length: its reader takes them piece by piece, and keeps no line objects)."""
        searched = self._position
        while (end := self._buffer.find(b"\n", searched)) < 0:
            if 0 <= size <= self._available:
                return self._take(size)
            searched = len(self._buffer)
            if not self._fill():
                return self._take(self._available)
        length = end + 1 - self._position
        return self._take(length if size < 0 else min(length, size))

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            while self._fill():
                pass
            return self._take(self._available)
        if size > self._available:
            self.guard.announced(size - self._available)
        while self._available < size and self._fill():
            pass
        return self._take(min(size, self._available))

    def close(self) -> None:
        self.closed = True

    def _take(self, count: int) -> bytes:
        start = self._position
        data = bytes(self._buffer[start : start + count])
        self._position = start + count
        if self._position == len(self._buffer):
            self._buffer.clear()
            self._position = 0
        elif self._position > _RECV_BYTES and self._position * 2 > len(self._buffer):
            del self._buffer[: self._position]
            self._position = 0
        return data

    def _fill(self) -> bool:
        """Reads once more from the server; False at the end of the stream."""
        while True:
            if self._inflater is not None and self._inflater.unconsumed_tail:
                data = self._inflater.decompress(self._inflater.unconsumed_tail, _RECV_BYTES)
            else:
                raw = self._sock.recv(_RECV_BYTES)
                if not raw:
                    return False
                data = (
                    raw if self._inflater is None else self._inflater.decompress(raw, _RECV_BYTES)
                )
            if data:
                self.guard.received(len(data))
                self._buffer += data
                return True


class GuardedSocket(socket.socket):
    """A plain TCP socket whose reads are bounded per answer (module doc)."""

    guard: ReadGuard

    def makefile(self, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if mode == "rb":
            return GuardedReader(self)
        return super().makefile(mode, *args, **kwargs)  # type: ignore[call-overload]

    def sendall(self, data: Any, flags: int = 0) -> None:
        self.guard.writable()
        self.guard.expecting(bytes(data[:64]))
        super().sendall(data, flags)


class GuardedSSLSocket(ssl.SSLSocket):
    """The TLS form of :class:`GuardedSocket`; its guard is handed over at the handshake."""

    guard: ReadGuard

    def makefile(self, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if mode == "rb":
            return GuardedReader(self)
        return super().makefile(mode, *args, **kwargs)  # type: ignore[call-overload]

    def sendall(self, data: Any, flags: int = 0) -> None:
        self.guard.writable()
        self.guard.expecting(bytes(data[:64]))
        super().sendall(data, flags)


def guard_of(sock: socket.socket | None) -> ReadGuard:
    """The guard of a connection the adapters opened (always a guarded socket)."""
    guard = getattr(sock, "guard", None)
    if not isinstance(guard, ReadGuard):
        raise MailServerError(FailureCategory.NETWORK, "not connected")
    return guard
