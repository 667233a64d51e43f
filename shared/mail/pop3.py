"""A POP3 session on a mailbox (RFC 1939, 2449, 2595, 5034), for the fetcher and the probe.

Mailroom speaks POP3 itself rather than through poplib: poplib refuses lines over 2,048 bytes
(one such mail would stop a mailbox for good) and rewrites every line ending as CRLF. Here a
mail is returned exactly as the server sent it; only the dot-stuffing is undone. Lines may be
of any length: every read goes through the connection's guarded reader
(``shared.mail.guarded_socket``), and every multi-line answer has a budget of its own. RETR
may bring the size the server LISTed plus a small slack (:func:`retr_budget`); a server that
sends more raises :class:`MailLargerThanListed`, after which the connection is unusable (the
answer was cut off) and the fetcher quarantines that mail. SASL challenges are answered at
most three times. Server text in a reason is a short, printable excerpt.

Implicit TLS (995), or STLS when TLS is unchecked and the server offers it; a server whose
STLS was seen before (``requires_tls``) never gets credentials without it. Deletions only
take effect at QUIT (RFC 1939 UPDATE state): a session that drops before QUIT deletes nothing.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from shared.contracts.status_reports import FailureCategory
from shared.email_servers import AuthType, EmailServer
from shared.mail import sasl
from shared.mail.connector import Connector
from shared.mail.errors import MailServerError, describe, excerpt
from shared.mail.guarded_socket import AnswerTooLarge, GuardedReader, mebibytes
from shared.mail.tls import connect_address, tls_server_name

# RFC 2449 allows status lines of 512 octets; a server's banner gets some room beyond that.
_STATUS_LINE_BYTES = 4096
# What CAPA may answer, and each mail's share of a LIST or UIDL answer ("n uidl", a UIDL has
# at most 70 characters), for a maildrop of the size STAT names (at most _LISTED_MAILS).
_CAPA_BYTES = 64 * 1024
_LISTING_BYTES_PER_MAIL = 128
_LISTED_MAILS = 500_000
# Bytes taken from the reader at a time: a line of any length arrives in pieces of this size.
_PIECE_BYTES = 64 * 1024
# A UIDL is 1-70 characters 0x21-0x7E (RFC 1939); anything else is kept as its digest.
_UIDL = re.compile(rb"[\x21-\x7e]{1,70}")

T = TypeVar("T")
Overflow = Callable[[], "MailLargerThanListed"]


def retr_budget(listed_size: int) -> int:
    """What RETR may bring for a mail LISTed with ``listed_size`` bytes.

    RFC 1939 asks for the exact size with CRLF line ends, without the dot-stuffing. The slack
    covers servers that count a little differently: Dovecot ends a mail that lacks a final
    line break with CRLF (an empty mail is sent as one empty line), others count LF line ends
    as one byte.
    """
    return listed_size + 1024 + listed_size // 64


@dataclass(frozen=True)
class Pop3Message:
    number: int
    uidl: str
    size: int


class MailLargerThanListed(AnswerTooLarge):
    """The server sent more for one mail than its budget allows; the connection is unusable
    afterwards (the answer was cut off)."""


class Pop3Mailbox:
    def __init__(self, server: EmailServer, secret: str | None, connector: Connector) -> None:
        self.server = server
        self._secret = secret  # the password (Basic) or an access token (OAuth2)
        self._connector = connector
        self._sock: socket.socket | None = None
        self._reader: GuardedReader | None = None
        self._host, self._port = connect_address(server)
        self._sizes: dict[int, int] = {}
        self._capa: dict[str, list[str]] = {}
        self.capabilities: frozenset[str] = frozenset()
        self.started_tls = False

    # --- connecting ------------------------------------------------------------------------

    def open(self) -> None:
        try:
            self._open()
        except MailServerError:
            self.close()
            raise
        except _Refused as refused:
            self.close()
            raise self._refusal(refused) from None
        except (OSError, EOFError) as exc:
            self.close()
            raise self._describe(exc) from exc

    def _open(self) -> None:
        sock: socket.socket = self._connector.connect(self.server)
        if self.server.tls:
            sock = self._connector.tls(self.server).wrap_socket(sock)
        self._attach(sock)
        self._status()  # the greeting
        self._read_capabilities()
        if not self.server.tls:
            if "STLS" in self.capabilities:
                self._start_tls()
            elif self.server.requires_tls:
                raise MailServerError(
                    FailureCategory.TLS,
                    "the server no longer offers STLS, which it offered before: Mailroom sends "
                    "no credentials without TLS",
                )
        try:
            if self.server.auth_type is AuthType.OAUTH2:
                self._sasl_login(self.server.username, self._secret or "")
            else:
                self._command(f"USER {self.server.username}")
                self._command(f"PASS {self._secret or ''}")
        except _Refused as refused:
            raise MailServerError(
                FailureCategory.AUTHENTICATION, f"authentication failed: server said {refused}"
            ) from None

    def _attach(self, sock: socket.socket) -> None:
        self._sock = sock
        reader = sock.makefile("rb")
        if not isinstance(reader, GuardedReader):
            raise TypeError("POP3 needs a connection opened by shared.mail.connector")
        self._reader = reader

    def _start_tls(self) -> None:
        """STLS (RFC 2595). Bytes the server sent behind its +OK would be read as if they came
        over TLS (an injection, CVE-2011-0411's kind): they fail the session instead."""
        self._command("STLS")
        if self._require_reader().pending:
            raise MailServerError(FailureCategory.TLS, "the server sent data behind its STLS +OK")
        context: Any = self._connector.tls(self.server)
        self._attach(context.wrap_socket(self._require_socket()))
        self.started_tls = True
        self._read_capabilities()

    def _read_capabilities(self) -> None:
        try:
            self._command("CAPA")
        except _Refused:
            self._capa = {}  # CAPA is optional (RFC 2449)
        else:
            self._capa = {}
            for line in self._multiline(_CAPA_BYTES, "CAPA").splitlines():
                words = line.decode("utf-8", "replace").split()
                if words:
                    self._capa[words[0].upper()] = words[1:]
        self.capabilities = frozenset(self._capa)

    def _sasl_login(self, user: str, access_token: str) -> None:
        """``AUTH <mechanism>``, then the response on a line of its own (RFC 5034). A token
        does not fit the 255 octets a command line may have, so it is not sent as an initial
        response (Microsoft documents this two-step form).

        A refused token comes back as a ``+ <challenge>`` carrying the error; the client
        answers it and the server then sends ``-ERR``. A server that keeps challenging gets
        the client's cancel, then is given up (:class:`shared.mail.sasl.Responder`).
        """
        mechanism = sasl.choose_mechanism(self._capa.get("SASL", []))
        respond = sasl.TokenResponder(mechanism, user, access_token)
        self._send(f"AUTH {mechanism}")
        while not self._status(continuation=True).startswith(b"+OK"):
            response = respond()
            self._send("*" if response is None else base64.b64encode(response).decode("ascii"))

    # --- the mailbox -----------------------------------------------------------------------

    def stat(self) -> tuple[int, int]:
        """STAT: how many mails the maildrop holds, and their size."""
        answer = self._call(lambda: self._command("STAT"))
        fields = answer.split()
        if len(fields) < 3 or not (fields[1].isdigit() and fields[2].isdigit()):
            raise self._unexpected("STAT", answer)
        return int(fields[1]), int(fields[2])

    def listing(self) -> list[Pop3Message]:
        """Every mail in the maildrop with its unique id (UIDL) and size.

        The answers may be as long as the number of mails STAT names requires. A UIDL that is
        not what RFC 1939 allows (1-70 printable characters) is named by its digest
        (``~<sha256>``), which fits the places a UIDL is stored and published.
        """
        count, _ = self.stat()
        budget = _CAPA_BYTES + _LISTING_BYTES_PER_MAIL * min(count, _LISTED_MAILS)
        uidls = dict(self._call(lambda: self._listed("UIDL", budget)))
        sizes = {n: int(v) for n, v in self._call(lambda: self._listed("LIST", budget))}
        self._sizes = sizes
        return [
            Pop3Message(number=number, uidl=_uidl(raw), size=sizes.get(number, 0))
            for number, raw in sorted(uidls.items())
        ]

    def retrieve(self, number: int) -> bytes:
        """The mail exactly as the server sent it, dot-stuffing undone. At most
        :func:`retr_budget` of its LISTed size, else :class:`MailLargerThanListed`."""
        listed = self._sizes.get(number)
        budget = self._connector.limits.max_bytes if listed is None else retr_budget(listed)

        def overflow() -> MailLargerThanListed:
            if listed is None:
                return MailLargerThanListed(
                    f"server sent more than {mebibytes(budget)} in its answer to RETR"
                )
            return MailLargerThanListed(
                f"the server sent more than the {listed} bytes it listed for this mail"
            )

        return self._call(lambda: self._retrieve(f"RETR {number}", budget, budget, overflow))

    def header(self, number: int) -> bytes:
        """The header block only (``TOP n 0``), for a mail not handed over whole.

        At most the connection's answer limit is kept (a longer header block is cut there);
        the server may send no more than the mail's RETR budget.
        """
        listed = self._sizes.get(number)
        keep = self._connector.limits.max_bytes
        budget = keep if listed is None else max(keep, retr_budget(listed))

        def overflow() -> MailLargerThanListed:
            return MailLargerThanListed(
                f"the server sent more than {budget} bytes in its answer to TOP {number} 0"
            )

        return self._call(lambda: self._retrieve(f"TOP {number} 0", budget, keep, overflow))

    def delete(self, number: int) -> None:
        self._call(lambda: self._command(f"DELE {number}"))

    def commit(self) -> None:
        """QUIT: the server removes the mails marked deleted."""
        try:
            self._call(lambda: self._command("QUIT"))
        finally:
            self.close()

    def close(self) -> None:
        """Drop the connection without QUIT: nothing marked deleted is removed."""
        sock, self._sock, self._reader = self._sock, None, None
        if sock is not None:
            with contextlib.suppress(OSError):  # already gone: nothing left to release
                sock.close()

    def __enter__(self) -> Pop3Mailbox:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- commands and answers --------------------------------------------------------------

    def _retrieve(self, command: str, budget: int, keep: int, overflow: Overflow) -> bytes:
        reader = self._require_reader()
        # The wire carries at most the budget, its dot-stuffing (one byte per line of at least
        # two) and the status line; the reader takes one more piece at a time.
        with reader.guard.allowing(2 * budget + _STATUS_LINE_BYTES + _PIECE_BYTES):
            self._command(command)
            verb = command.split(maxsplit=1)[0]
            return self._multiline(budget, verb, keep=keep, overflow=overflow)

    def _listed(self, command: str, budget: int) -> list[tuple[int, bytes]]:
        """``n value`` lines of a LIST or UIDL answer."""
        pairs: list[tuple[int, bytes]] = []
        with self._require_reader().guard.allowing(budget + _PIECE_BYTES):
            self._command(command)
            for line in self._multiline(budget, command).splitlines():
                number, _, value = line.strip().partition(b" ")
                value = value.strip()
                if not number.isdigit() or not value:
                    raise self._unexpected(command, line)
                if command == "LIST" and not value.split()[0].isdigit():
                    raise self._unexpected(command, line)
                pairs.append((int(number), value.split()[0] if command == "LIST" else value))
        return pairs

    def _command(self, line: str) -> bytes:
        self._send(line)
        return self._status()

    def _send(self, line: str) -> None:
        data = line.encode("utf-8")
        if any(c in data for c in b"\r\n\x00"):
            # A user name or password with a line break would be a second command.
            raise MailServerError(
                FailureCategory.AUTHENTICATION,
                "a command to the server would contain a line break or NUL; it is not sent",
            )
        self._require_socket().sendall(data + b"\r\n")

    def _status(self, *, continuation: bool = False) -> bytes:
        """The next status line: ``+OK …`` (or a SASL ``+ …`` when ``continuation``);
        ``-ERR`` raises :class:`_Refused`, anything else is a protocol error."""
        line = self._require_reader().readline(_STATUS_LINE_BYTES)
        if not line:
            raise ConnectionError("closed")
        if not line.endswith(b"\n"):  # a longer one was cut by the guard
            raise ConnectionError("closed in the middle of a line")
        if line.startswith(b"+OK"):
            return line
        if line.startswith(b"-ERR"):
            raise _Refused(excerpt(line[4:]))
        if continuation and line[:2] in (b"+ ", b"+\r", b"+\n"):
            return line
        raise self._unexpected(None, line)

    def _multiline(
        self,
        budget: int,
        command: str,
        *,
        keep: int | None = None,
        overflow: Overflow | None = None,
    ) -> bytes:
        """The lines of a multi-line answer up to the terminating ``.``: dot-stuffing undone,
        line ends as sent. More than ``budget`` bytes raises; beyond ``keep`` bytes the
        answer is read to its end but not kept."""
        reader = self._require_reader()
        keep = budget if keep is None else keep
        kept = bytearray()
        taken = 0
        at_line_start = True
        while True:
            piece = reader.read_piece(max(3, min(budget - taken + 2, _PIECE_BYTES)))
            if not piece:
                raise ConnectionError("closed")
            if at_line_start and piece[:1] == b".":
                if piece in (b".\r\n", b".\n"):
                    return bytes(kept)
                piece = piece[1:]
            at_line_start = piece.endswith(b"\n")
            taken += len(piece)
            if taken > budget:
                if overflow is not None:
                    raise overflow()
                raise MailLargerThanListed(
                    f"server sent more than {mebibytes(budget)} in its answer to {command}"
                )
            if len(kept) < keep:
                kept += piece[: keep - len(kept)]

    # --- plumbing --------------------------------------------------------------------------

    def _call(self, operation: Callable[[], T]) -> T:
        try:
            return operation()
        except _Refused as refused:
            raise self._refusal(refused) from None
        except MailServerError:
            raise
        except (OSError, EOFError) as exc:
            raise self._describe(exc) from exc

    def _require_socket(self) -> socket.socket:
        if self._sock is None:
            raise MailServerError(FailureCategory.NETWORK, "not connected")
        return self._sock

    def _require_reader(self) -> GuardedReader:
        if self._reader is None:
            raise MailServerError(FailureCategory.NETWORK, "not connected")
        return self._reader

    def _refusal(self, refused: _Refused) -> MailServerError:
        return MailServerError(
            FailureCategory.PROTOCOL,
            f"POP3 server {self._host}:{self._port} answered: -ERR {refused}",
        )

    def _unexpected(self, command: str | None, line: bytes) -> MailServerError:
        to = f" to {command}" if command else ""
        return MailServerError(
            FailureCategory.PROTOCOL,
            f"POP3 server {self._host}:{self._port} answered{to}: {excerpt(line)}",
        )

    def _describe(self, exc: BaseException) -> MailServerError:
        return describe(exc, self._host, self._port, tls_server_name(self.server))


class _Refused(Exception):
    """The server answered ``-ERR``; the argument is its text (an excerpt)."""


def _uidl(raw: bytes) -> str:
    if _UIDL.fullmatch(raw):
        return raw.decode("ascii")
    return "~" + hashlib.sha256(raw).hexdigest()
