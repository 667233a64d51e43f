"""A POP3 session on a mailbox (poplib), for the fetcher and the probe.

Implicit TLS (995), or STLS when TLS is unchecked and the server offers it. Deletions only
take effect at QUIT (RFC 1939 UPDATE state): a session that drops before QUIT deletes nothing.
"""

from __future__ import annotations

import base64
import contextlib
import poplib
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shared.contracts.status_reports import FailureCategory
from shared.email_servers import AuthType, EmailServer
from shared.mail import sasl
from shared.mail.connector import Connector
from shared.mail.errors import MailServerError, describe
from shared.mail.tls import connect_address, tls_server_name


@dataclass(frozen=True)
class Pop3Message:
    number: int
    uidl: str
    size: int


class Pop3Mailbox:
    def __init__(self, server: EmailServer, secret: str | None, connector: Connector) -> None:
        self.server = server
        self._secret = secret  # the password (Basic) or an access token (OAuth2)
        self._connector = connector
        self._client: poplib.POP3 | None = None
        self._host, self._port = connect_address(server)
        self.capabilities: frozenset[str] = frozenset()

    def open(self) -> None:
        try:
            self._open()
        except MailServerError:
            self.close()
            raise
        except (poplib.error_proto, OSError, EOFError) as exc:
            self.close()
            raise self._describe(exc) from exc

    def _open(self) -> None:
        context: Any = self._connector.tls(self.server)
        client = _ConnectedPOP3(self._connect, self._host, self._port)
        self._client = client
        self.capabilities = frozenset(_capabilities(client))
        if not self.server.tls:
            if "STLS" in self.capabilities:
                client.stls(context)
                self.capabilities = frozenset(_capabilities(client))
            elif self.server.requires_tls:
                raise MailServerError(
                    FailureCategory.TLS,
                    "the server no longer offers STLS, which it offered before: Mailroom sends "
                    "no credentials without TLS",
                )
        try:
            if self.server.auth_type is AuthType.OAUTH2:
                _sasl_login(client, self.server.username, self._secret or "")
            else:
                client.user(self.server.username)
                client.pass_(self._secret or "")
        except poplib.error_proto as exc:
            raise MailServerError(
                FailureCategory.AUTHENTICATION, f"authentication failed: server said {_text(exc)}"
            ) from exc

    def _connect(self) -> socket.socket:
        sock: socket.socket = self._connector.connect(self.server)
        if self.server.tls:
            sock = self._connector.tls(self.server).wrap_socket(sock)
        return sock

    def listing(self) -> list[Pop3Message]:
        """Every mail in the maildrop with its unique id (UIDL) and size."""
        client = self._require()
        try:
            uidls = dict(_pairs(client.uidl()[1]))
            sizes = dict(_pairs(client.list()[1]))
        except (poplib.error_proto, OSError, EOFError) as exc:
            raise self._describe(exc) from exc
        return [
            Pop3Message(number=int(number), uidl=uidl, size=int(sizes.get(number, "0")))
            for number, uidl in sorted(uidls.items(), key=lambda item: int(item[0]))
        ]

    def retrieve(self, number: int) -> bytes:
        """The raw mail; poplib undoes the dot-stuffing, lines get their CRLF back."""
        try:
            lines = self._require().retr(number)[1]
        except (poplib.error_proto, OSError, EOFError) as exc:
            raise self._describe(exc) from exc
        return b"".join(line + b"\r\n" for line in lines)

    def header(self, number: int) -> bytes:
        """The header block only (``TOP n 0``), for a mail too large to hand over."""
        try:
            lines = self._require().top(number, 0)[1]
        except (poplib.error_proto, OSError, EOFError) as exc:
            raise self._describe(exc) from exc
        return b"".join(line + b"\r\n" for line in lines)

    def delete(self, number: int) -> None:
        try:
            self._require().dele(number)
        except (poplib.error_proto, OSError, EOFError) as exc:
            raise self._describe(exc) from exc

    def commit(self) -> None:
        """QUIT: the server removes the mails marked deleted."""
        client, self._client = self._require(), None
        try:
            client.quit()
        except (poplib.error_proto, OSError, EOFError) as exc:
            raise self._describe(exc) from exc

    def close(self) -> None:
        """Drop the connection without QUIT: nothing marked deleted is removed."""
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(OSError):  # already gone: nothing left to release
                client.close()

    def __enter__(self) -> Pop3Mailbox:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _require(self) -> poplib.POP3:
        if self._client is None:
            raise MailServerError(FailureCategory.NETWORK, "not connected")
        return self._client

    def _describe(self, exc: BaseException) -> MailServerError:
        if isinstance(exc, poplib.error_proto):
            return MailServerError(
                FailureCategory.PROTOCOL,
                f"POP3 server {self._host}:{self._port} answered: {_text(exc)}",
            )
        return describe(exc, self._host, self._port, tls_server_name(self.server))


class _ConnectedPOP3(poplib.POP3):
    """poplib on a connection Mailroom opened itself (``shared.mail.connector``)."""

    def __init__(self, connect: Callable[[], socket.socket], host: str, port: int) -> None:
        self._connect_socket = connect
        super().__init__(host, port)

    def _create_socket(self, timeout: float) -> socket.socket:
        return self._connect_socket()


def _sasl_login(client: poplib.POP3, user: str, access_token: str) -> None:
    """``AUTH <mechanism>``, then the response on a line of its own (RFC 5034); poplib has no
    AUTH command. A token does not fit the 255 octets a command line may have, so it is not
    sent as an initial response (Microsoft documents this two-step form).

    A refused token comes back as a ``+ <challenge>`` carrying the error; the client answers
    it and the server then sends ``-ERR`` (raised as ``error_proto``).
    """
    try:
        offered = client.capa().get("SASL", [])
    except poplib.error_proto:
        offered = []
    mechanism = sasl.choose_mechanism(offered)
    respond = sasl.TokenResponder(mechanism, user, access_token)
    # poplib's own line reader and writer (not in typeshed): they keep its debug and limits.
    putline, getresp = client._putcmd, client._getresp  # type: ignore[attr-defined]
    putline(f"AUTH {mechanism}")
    answer: bytes = getresp()  # raises error_proto on -ERR (mechanism not offered)
    while not answer.startswith(b"+OK"):
        response = respond()
        putline("*" if response is None else base64.b64encode(response).decode("ascii"))
        answer = getresp()


def _capabilities(client: poplib.POP3) -> list[str]:
    try:
        return [name.upper() for name in client.capa()]
    except poplib.error_proto:
        return []  # CAPA is optional (RFC 2449)


def _pairs(lines: list[bytes]) -> list[tuple[str, str]]:
    pairs = []
    for line in lines:
        number, _, value = line.decode("ascii", "replace").partition(" ")
        pairs.append((number, value.strip()))
    return pairs


def _text(exc: BaseException) -> str:
    value = exc.args[0] if exc.args else exc
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
