"""An IMAP session on a server's inbox folder (imapclient), for the fetcher and the probe.

Implicit TLS, or STARTTLS when TLS is unchecked and the server offers it (REQUIREMENTS: "the
server may still upgrade the connection"); the certificate is verified against the SNI name
when set, else the host. COMPRESS=DEFLATE is used when offered unless the admin disabled it.
Every failure surfaces as :class:`~shared.mail.errors.MailServerError` with a reason an admin
can act on.
"""

from __future__ import annotations

import contextlib
import imaplib
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from imapclient import IMAPClient, SocketTimeout
from imapclient.exceptions import IMAPClientError, LoginError

from shared.contracts.status_reports import FailureCategory
from shared.email_servers import DEFAULT_INBOX_FOLDER, AuthType, EmailServer
from shared.mail import sasl
from shared.mail.connector import Connector
from shared.mail.errors import MailServerError, describe, excerpt
from shared.mail.guarded_socket import GuardedReader, ReadGuard, guard_of
from shared.mail.imap_compress import enable_deflate
from shared.mail.tls import connect_address, tls_server_name

SEEN = b"\\Seen"
# UIDs named in one command: 2,000 of up to 10 digits stay far below servers' line limits.
_UIDS_PER_COMMAND = 2000
# What a FETCH answer may hold beyond the mails' checked sizes (the items' names, flags, UIDs).
_FETCH_OVERHEAD_PER_MAIL = 1024


@dataclass(frozen=True)
class FolderState:
    uidvalidity: int
    uidnext: int | None
    exists: int


class ImapMailbox:
    """One logged-in IMAP connection with the server's inbox folder selected."""

    def __init__(self, server: EmailServer, secret: str | None, connector: Connector) -> None:
        self.server = server
        self.folder = server.inbox_folder or DEFAULT_INBOX_FOLDER
        self._secret = secret  # the password (Basic) or an access token (OAuth2)
        self._connector = connector
        self._client: IMAPClient | None = None
        self.capabilities: frozenset[str] = frozenset()
        self.compressed = False
        self.state: FolderState | None = None
        self._host, self._port = connect_address(server)

    # --- connecting ------------------------------------------------------------------------

    def open(self) -> FolderState:
        try:
            return self._open()
        except MailServerError:
            self.close()
            raise
        except (IMAPClientError, OSError, EOFError) as exc:
            self.close()
            raise self._describe(exc) from exc

    def _open(self) -> FolderState:
        connector = self._connector
        context: Any = connector.tls(self.server)
        client = _ConnectedClient(
            self._connect, self._host, self._port, self.server.tls, connector.timeout
        )
        client.ssl_context = context
        self._client = client
        if not self.server.tls:
            if client.has_capability("STARTTLS"):
                client.starttls(context)
            elif self.server.requires_tls:
                raise MailServerError(FailureCategory.TLS, _NO_LONGER_STARTTLS)
        try:
            self._login(client)
        except LoginError as exc:
            raise MailServerError(
                FailureCategory.AUTHENTICATION,
                f"authentication failed: server said {_text(exc)}",
            ) from exc
        self.capabilities = frozenset(c.decode().upper() for c in client.capabilities())
        if "COMPRESS=DEFLATE" in self.capabilities and not self.server.disable_compression:
            enable_deflate(client._imap)
            self.compressed = True
        return self.select()

    def _connect(self) -> socket.socket:
        sock: socket.socket = self._connector.connect(self.server)
        if self.server.tls:
            sock = self._connector.tls(self.server).wrap_socket(sock)
        return sock

    def _login(self, client: IMAPClient) -> None:
        """AUTHENTICATE PLAIN when offered: it carries UTF-8, where LOGIN allows only ASCII.

        REQUIREMENTS allow any Unicode in user names and passwords. OAuth2 servers get the
        access token through OAUTHBEARER or XOAUTH2 (``shared.mail.sasl``).
        """
        username, password = self.server.username, self._secret or ""
        if self.server.auth_type is AuthType.OAUTH2:
            offered = (c.decode().upper() for c in client.capabilities())
            mechanism = sasl.choose_mechanism(
                name.removeprefix("AUTH=") for name in offered if name.startswith("AUTH=")
            )
            self._sasl(client, mechanism, sasl.TokenResponder(mechanism, username, password))
        elif client.has_capability("AUTH=PLAIN"):
            # Not imapclient's plain_login: it answers every challenge, for ever.
            self._sasl(client, "PLAIN", sasl.PlainResponder(username, password))
        elif (username + password).isascii():
            client.login(username, password)
        else:
            raise MailServerError(
                FailureCategory.AUTHENTICATION,
                "the user name or password has non-ASCII characters and the server offers no "
                "login method that carries them (AUTH=PLAIN)",
            )

    def _sasl(self, client: IMAPClient, mechanism: str, respond: sasl.Responder) -> None:
        try:
            client.sasl_login(mechanism, respond)
        except MailServerError as error:  # the responder gave up in mid-AUTHENTICATE
            self.guard.abandon(error.reason)
            raise

    def select(self) -> FolderState:
        client = self._require()
        try:
            info = client.select_folder(self.folder)
        except IMAPClientError as exc:
            text = _text(exc)
            if "NONEXISTENT" in text.upper() or "doesn't exist" in text.lower():
                raise MailServerError(
                    FailureCategory.FOLDER_MISSING, f"folder {self.folder!r} does not exist"
                ) from exc
            raise
        self._take_announcements()  # SELECT's own EXISTS/RECENT describe what we just read
        self.state = FolderState(
            uidvalidity=int(info[b"UIDVALIDITY"]),
            uidnext=int(info[b"UIDNEXT"]) if b"UIDNEXT" in info else None,
            exists=int(info.get(b"EXISTS", 0)),
        )
        return self.state

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            client.logout()
        except (IMAPClientError, MailServerError, OSError, EOFError):
            # Already gone, or an answer was cut off and LOGOUT's meets the rest of it.
            with contextlib.suppress(IMAPClientError, OSError):
                client.shutdown()

    def __enter__(self) -> ImapMailbox:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- reading ---------------------------------------------------------------------------

    @property
    def supports_idle(self) -> bool:
        return "IDLE" in self.capabilities

    def unseen_uids(self) -> list[int]:
        return sorted(int(uid) for uid in self._call(lambda c: c.search(["UNSEEN"])))

    def uids_after(self, last_uid: int) -> list[int]:
        """UIDs above ``last_uid``; ``n:*`` also names the last mail, so it is filtered out."""
        found = self._call(lambda c: c.search(["UID", f"{last_uid + 1}:*"]))
        return sorted(int(uid) for uid in found if int(uid) > last_uid)

    def sizes(self, uids: list[int]) -> dict[int, int]:
        """Asked for a slice of the UIDs at a time: a first visit may find tens of thousands
        of mails, and one command naming them all would pass the line length servers accept
        (Dovecot: 64 KiB), failing the mailbox on every attempt."""
        sizes: dict[int, int] = {}
        for start in range(0, len(uids), _UIDS_PER_COMMAND):
            chunk = uids[start : start + _UIDS_PER_COMMAND]
            answer = self._call(lambda c, chunk=chunk: c.fetch(chunk, ["RFC822.SIZE"]))
            sizes.update(
                {
                    int(uid): int(data[b"RFC822.SIZE"])
                    for uid, data in answer.items()
                    if b"RFC822.SIZE" in data  # not news of the mail's flags alone
                }
            )
        return sizes

    def bodies(self, sizes: dict[int, int]) -> dict[int, bytes]:
        """The raw mails, byte for byte as the server holds them; ``PEEK`` keeps them unread.

        ``sizes`` are the checked sizes (RFC822.SIZE): the answer may hold those and little
        more, so a server that lies about a size fails the FETCH instead of filling memory.
        """
        allowed = sum(sizes.values()) + _FETCH_OVERHEAD_PER_MAIL * len(sizes)
        with self.guard.allowing(allowed):
            answer = self._call(lambda c: c.fetch(sorted(sizes), ["BODY.PEEK[]"]))
        return {
            int(uid): bytes(data[b"BODY[]"])
            for uid, data in answer.items()
            if isinstance(data.get(b"BODY[]"), bytes)  # not NIL, not news of its flags alone
        }

    def headers(self, uids: list[int]) -> dict[int, bytes]:
        """Only the header blocks (for mails too large to hand over)."""
        answer = self._call(lambda c: c.fetch(uids, ["BODY.PEEK[HEADER]"]))
        return {
            int(uid): bytes(data[b"BODY[HEADER]"])
            for uid, data in answer.items()
            if isinstance(data.get(b"BODY[HEADER]"), bytes)
        }

    def mark_seen(self, uids: list[int]) -> None:
        if uids:
            self._call(lambda c: c.add_flags(uids, [SEEN], silent=True))

    def mark_flagged(self, uids: list[int]) -> None:
        if uids:
            self._call(lambda c: c.add_flags(uids, [b"\\Flagged"], silent=True))

    @contextmanager
    def idling(self) -> Iterator[IdleWatch]:
        """IDLE until the block ends; the server tells of new mail meanwhile (RFC 2177).

        A mail that arrived while other commands ran was announced with *their* answers, or
        just before IDLE's go-ahead; imaplib files such announcements away, where idle_check
        never looks. They count as news at once, or that mail would wait for the next renewal.
        """
        missed = self._take_announcements()
        self._call(lambda c: c.idle())
        missed = self._take_announcements() or missed
        try:
            yield IdleWatch(self, missed)
        finally:
            if self.guard.broken is None:  # else the connection is out of step: no DONE
                self._call(lambda c: c.idle_done())

    def _take_announcements(self) -> bool:
        untagged = self._require()._imap.untagged_responses
        found = [untagged.pop(name, None) for name in ("EXISTS", "RECENT", "EXPUNGE")]
        return any(found)

    # --- plumbing --------------------------------------------------------------------------

    def _require(self) -> IMAPClient:
        if self._client is None:
            raise MailServerError(FailureCategory.NETWORK, "not connected")
        return self._client

    @property
    def guard(self) -> ReadGuard:
        return guard_of(self._require().socket())

    @property
    def unread_input(self) -> bool:
        """The server's lines already received but not read: polling would not show them."""
        reader = self._require()._imap.file
        return isinstance(reader, GuardedReader) and reader.pending

    def _call(self, operation: Any) -> Any:
        try:
            return operation(self._require())
        except MailServerError:
            raise
        except (IMAPClientError, OSError, EOFError) as exc:
            raise self._describe(exc) from exc

    def _describe(self, exc: BaseException) -> MailServerError:
        if isinstance(exc, IMAPClientError) and not isinstance(exc, OSError):
            return MailServerError(
                FailureCategory.PROTOCOL,
                f"IMAP server {self._host}:{self._port} answered: {_text(exc)}",
            )
        return describe(exc, self._host, self._port, tls_server_name(self.server))


class IdleWatch:
    def __init__(self, mailbox: ImapMailbox, missed: bool = False) -> None:
        self._mailbox = mailbox
        self._missed = missed
        self._quick_empty = 0

    def news(self, timeout: float) -> bool:
        """True when the server announced a new or expunged mail within ``timeout`` seconds.

        Raises when the server said BYE or closed the connection: imapclient's ``idle_check``
        swallows EOF and answers "nothing" at once, again and again, which would look like a
        healthy, quiet mailbox.
        """
        if self._missed:
            self._missed = False
            return True
        if self._mailbox.unread_input:
            # The server's lines came in one read with IDLE's go-ahead (one compressed block,
            # one TLS record): they are received already, and polling the socket would wait
            # for the next renewal.
            return True
        self._mailbox.guard.restart()  # each wait is an answer of its own (IDLE lasts minutes)
        started = time.monotonic()
        responses = self._mailbox._call(lambda c: c.idle_check(timeout=timeout))
        mailbox = self._mailbox
        where = f"{mailbox._host}:{mailbox._port}"
        if any(response[:1] == (b"BYE",) for response in responses):
            raise MailServerError(FailureCategory.NETWORK, f"{where} ended the session (BYE)")
        quick = not responses and time.monotonic() - started < timeout / 2
        self._quick_empty = self._quick_empty + 1 if quick else 0
        if self._quick_empty >= 3:
            raise MailServerError(FailureCategory.NETWORK, f"{where} closed the connection")
        return any(
            len(response) >= 2 and response[1] in (b"EXISTS", b"RECENT", b"EXPUNGE")
            for response in responses
        )


_NO_LONGER_STARTTLS = (
    "the server no longer offers STARTTLS, which it offered before: Mailroom sends no "
    "credentials without TLS"
)


class _ConnectedIMAP4(imaplib.IMAP4):
    """imaplib on a connection Mailroom opened itself: to the checked address, with bounded
    reads, TLS already on for implicit TLS (``shared.mail.connector``)."""

    def __init__(self, connect: Callable[[], socket.socket], host: str, port: int) -> None:
        self._connect_socket = connect
        super().__init__(host, port)

    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        return self._connect_socket()


class _ConnectedClient(IMAPClient):  # type: ignore[misc] # imapclient is untyped
    """IMAPClient over :class:`_ConnectedIMAP4` (its one hook for how imaplib connects)."""

    def __init__(
        self, connect: Callable[[], socket.socket], host: str, port: int, tls: bool, timeout: float
    ) -> None:
        self._connect_socket = connect
        super().__init__(host, port=port, ssl=tls, timeout=SocketTimeout(timeout, timeout))
        # imapclient turns on imaplib's debug output, a log line for every protocol line:
        # customers' mail in the logs at DEBUG, and a cost for every line of a flood.
        self._imap.debug = 0

    def _create_IMAP4(self) -> imaplib.IMAP4:
        return _ConnectedIMAP4(self._connect_socket, self.host, self.port)


def _text(exc: BaseException) -> str:
    """What the server said, as a reason may quote it (``shared.mail.errors.excerpt``)."""
    text = str(exc)
    if text.startswith("b'") or text.startswith('b"'):
        text = text[2:-1]
    return excerpt(text)
