"""SMTP with the standard library: connect, secure, log in, send one transaction, probe.

- **TLS**: implicit TLS when the server's TLS box is checked (``SMTP_SSL``, port 465 by
  default); otherwise STARTTLS whenever the server offers it. Certificates are verified with
  :func:`shared.mail.tls.client_context` (system store + ``MAILROOM_CA_BUNDLE``) against
  :func:`shared.mail.tls.tls_server_name` (the SNI name, else the host).
- **AUTH** PLAIN/LOGIN with the plaintext password handed in by the caller (decrypted by
  ``SecretBox``), or OAUTHBEARER/XOAUTH2 with an OAuth2 access token
  (``shared.oauth.tokens``); neither is ever logged, and no reason built here quotes what was
  sent.
- **Connections** come from :class:`~shared.mail.connector.Connector`: a checked address, a
  timeout on every socket operation, bounded replies (a reply of endless lines is cut off).
- **Failures** are :class:`SmtpError` (a :class:`~shared.mail.errors.MailServerError`): the
  server's code and text, and whether trying again later may help (4xx, timeouts, dropped
  connections) or not (5xx).

:func:`send_transaction` runs MAIL/RCPT/DATA itself (not ``sendmail``) so that the caller can
record its intent before the mail is handed over (a :class:`Handover`): the record is made
once MAIL FROM is on its way, while the server answers it, and the mail's final ``.`` goes
out only after it. A server accepts a mail only at that line (RFC 5321 4.1.1.4; a connection
that breaks before it delivers nothing). An 8-bit mail is announced with ``BODY=8BITMIME``.

With a server that offers PIPELINING (RFC 2920: Postfix, Exchange, Microsoft 365 and Gmail
do), MAIL, every RCPT and DATA go out in one write and their replies are read in order: a mail
takes two round trips instead of three plus one per recipient. A server that does not offer it
gets one command at a time.

:func:`smtp_probe` is the connection test for SMTP servers (connect, EHLO, STARTTLS, AUTH,
NOOP; it never sends mail).
"""

from __future__ import annotations

import base64
import smtplib
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from shared.contracts.status_reports import FailureCategory
from shared.email_servers import AuthType, EmailServer
from shared.mail import sasl
from shared.mail.connector import Connector
from shared.mail.errors import MailServerError, describe, excerpt
from shared.mail.guarded_socket import AnswerTooLarge
from shared.mail.tls import connect_address, tls_server_name

SMTP_REPLY_CHARACTERS = 512

# What ends an exchange: a refusal, a lost connection, an answer over its limit (which leaves
# the connection unusable: _fail closes it).
_BROKEN = (smtplib.SMTPException, OSError, AnswerTooLarge)


class SmtpError(MailServerError):
    """An SMTP exchange failed. ``temporary``: another attempt later may succeed."""

    def __init__(
        self,
        category: FailureCategory,
        reason: str,
        *,
        temporary: bool,
        code: int | None = None,
        response: str | None = None,
    ) -> None:
        super().__init__(category, reason)
        self.temporary = temporary
        self.code = code
        self.response = response
        # The mail's final "." may have gone out: the server may have accepted the mail.
        self.handed_over = False


class _ConnectedSMTP(smtplib.SMTP):
    """smtplib on a connection Mailroom opened itself: to the checked address, with bounded
    replies, TLS already on for implicit TLS (``shared.mail.connector``)."""

    def __init__(self, connector: Connector, server: EmailServer, **kwargs: Any) -> None:
        self._connector = connector
        self._server = server
        super().__init__(**kwargs)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock: socket.socket = self._connector.connect(self._server)
        if self._server.tls:
            sock = self._connector.tls(self._server).wrap_socket(sock)
        return sock


def _text(message: bytes | str) -> str:
    """A server's reply as recorded and reported: one printable line, at most the 512
    characters of an SMTP reply line (RFC 5321 4.5.3.1.5)."""
    return excerpt(message, SMTP_REPLY_CHARACTERS)


def reply_error(code: int, message: bytes | str, what: str, where: str) -> SmtpError:
    """An SMTP reply that is not success, classified by its code (4xx temporary, 5xx final)."""
    text = _text(message)
    temporary = 400 <= code < 500 or code == -1
    category = FailureCategory.PROTOCOL
    if code in (454, 530, 534, 535, 538) and "auth" in what.lower():
        category = FailureCategory.AUTHENTICATION
    reason = f"{what} refused by {where}: {code} {excerpt(text)}".strip()
    return SmtpError(category, reason, temporary=temporary, code=code, response=text)


def _fail(exc: BaseException, server: EmailServer, what: str) -> SmtpError:
    host, port = connect_address(server)
    where = f"{host}:{port}"
    if isinstance(exc, SmtpError):
        return exc
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in exc.recipients.values()]
        first_code, first_text = next(iter(exc.recipients.values()))
        refused = ", ".join(sorted(exc.recipients))
        return SmtpError(
            FailureCategory.PROTOCOL,
            f"recipients refused by {where} ({refused}): {first_code} {excerpt(first_text)}",
            temporary=any(400 <= c < 500 for c in codes),
            code=first_code,
            response=_text(first_text),
        )
    if isinstance(exc, smtplib.SMTPSenderRefused):
        return reply_error(exc.smtp_code, exc.smtp_error, "sender address", where)
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        error = reply_error(exc.smtp_code, exc.smtp_error, "authentication", where)
        error.category = FailureCategory.AUTHENTICATION
        error.reason = f"authentication failed: {error.reason}"
        return error
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return SmtpError(
            FailureCategory.PROTOCOL, f"{where}: {what}: {exc}", temporary=False, code=None
        )
    if isinstance(exc, smtplib.SMTPResponseException):
        return reply_error(exc.smtp_code, exc.smtp_error, what, where)
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return SmtpError(
            FailureCategory.NETWORK, f"{where} closed the connection ({what})", temporary=True
        )
    if isinstance(exc, smtplib.SMTPException):
        if "infinite loop" in str(exc):  # smtplib's AUTH gave up after 5 challenges
            return SmtpError(
                FailureCategory.AUTHENTICATION,
                f"authentication failed: {where} went on challenging",
                temporary=False,
            )
        return SmtpError(
            FailureCategory.PROTOCOL, f"{where}: {what}: {excerpt(str(exc))}", temporary=True
        )
    described = describe(exc, host, port, tls_server_name(server))
    permanent = described.category in (FailureCategory.CERTIFICATE, FailureCategory.TLS)
    return SmtpError(described.category, described.reason, temporary=not permanent)


@dataclass
class SmtpSession:
    """One logged-in connection to one server, reusable for many transactions."""

    server: EmailServer
    client: smtplib.SMTP
    secure: bool
    authenticated: bool
    capabilities: list[str] = field(default_factory=list)

    @property
    def smtputf8(self) -> bool:
        return bool(self.client.has_extn("smtputf8"))

    @property
    def eight_bit(self) -> bool:
        """Takes an 8-bit mail (8BITMIME; SMTPUTF8 implies it)."""
        return bool(self.client.has_extn("8bitmime") or self.smtputf8)

    @property
    def pipelining(self) -> bool:
        return bool(self.client.has_extn("pipelining"))

    @property
    def closed(self) -> bool:
        """Closed (a transaction cut off, a connection lost or timed out): not reusable."""
        return self.client.sock is None

    def close(self) -> None:
        try:
            self.client.quit()
        except _BROKEN:
            self.client.close()


def open_session(
    server: EmailServer,
    secret: str | None,
    connector: Connector,
    *,
    local_hostname: str | None = None,
) -> SmtpSession:
    """Connect, EHLO, STARTTLS (or implicit TLS) and AUTH; raises :class:`SmtpError`."""
    host, port = connect_address(server)
    client: smtplib.SMTP | None = None
    step = "connect"
    try:
        client = _ConnectedSMTP(
            connector, server, local_hostname=local_hostname, timeout=connector.timeout
        )
        client.connect(host, port)
        step = "EHLO"
        client.ehlo()
        secure = server.tls
        if not server.tls and client.has_extn("starttls"):
            step = "STARTTLS"
            client.starttls(context=connector.tls(server))  # type: ignore[call-overload] # duck-typed
            client.ehlo()
            secure = True
        authenticated = False
        if server.username and secret:
            step = "AUTH"
            if not secure and server.requires_tls:
                raise SmtpError(
                    FailureCategory.TLS,
                    f"{host}:{port} no longer offers STARTTLS, which it offered before: "
                    "Mailroom sends no credentials without TLS",
                    temporary=True,
                )
            if not client.has_extn("auth"):
                raise SmtpError(
                    FailureCategory.AUTHENTICATION,
                    f"{host}:{port} offers no AUTH"
                    + ("" if secure else " without TLS (and no STARTTLS)"),
                    temporary=False,
                )
            if server.auth_type is AuthType.OAUTH2:
                _token_login(client, server.username, secret)
            else:
                client.login(server.username, secret)
            authenticated = True
        capabilities = sorted(
            f"{name.upper()} {value}".strip() for name, value in client.esmtp_features.items()
        )
        return SmtpSession(server, client, secure, authenticated, capabilities)
    except BaseException as exc:
        if client is not None:
            client.close()
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        raise _fail(exc, server, step) from exc


def _token_login(client: smtplib.SMTP, user: str, access_token: str) -> None:
    """AUTH OAUTHBEARER or XOAUTH2 with the initial response (RFC 4954); a refused token is
    answered with a 334 challenge, the client replies, and 535 follows. A server that keeps
    challenging gets the client's cancel (``*``) once the responder has had enough.

    Not ``smtplib``'s ``auth()``: it encodes the response as ASCII, and user names may be any
    Unicode (REQUIREMENTS).
    """
    mechanism = sasl.choose_mechanism(client.esmtp_features.get("auth", "").split())
    respond = sasl.TokenResponder(mechanism, user, access_token)
    code, reply = client.docmd("AUTH", f"{mechanism} {_b64(respond() or b'')}")
    while code == 334:  # ends: the responder raises once the server ignored the cancel
        answer = respond()
        code, reply = client.docmd("*" if answer is None else _b64(answer))
    if code not in (235, 503):  # 503: already authenticated
        raise smtplib.SMTPAuthenticationError(code, reply)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Handover(Protocol):
    """What must be committed before a mail is handed over to the server (module doc)."""

    def start(self) -> None:
        """MAIL FROM is on its way: record it, committed when this returns; raise if it
        cannot be (then nothing is handed over). Called again on a replaced connection."""


def send_transaction(
    session: SmtpSession,
    envelope_from: str,
    recipients: list[str],
    data: bytes,
    *,
    handover: Handover | None = None,
    smtputf8: bool = False,
) -> tuple[int, str]:
    """MAIL, RCPT (all or nothing) and DATA, pipelined where the server offers PIPELINING (the
    ``handover`` is made once MAIL FROM is written), then the mail with its final ``.``; the
    final reply ``(code, text)``.

    Any refused recipient ends the transaction before the mail's final ``.``, so a retry can
    never deliver twice to the recipients that were accepted.
    """
    client = session.client
    options = ["SMTPUTF8"] if smtputf8 else []
    if not data.isascii() and client.has_extn("8bitmime"):
        options.append("BODY=8BITMIME")
    if client.has_extn("size"):
        options.append(f"SIZE={len(data)}")
    progress = _Progress()
    try:
        if smtputf8:
            client.command_encoding = "utf-8"  # as smtplib's mail() does; rset() undoes it
        _envelope(
            client,
            envelope_from,
            recipients,
            options,
            handover,
            progress,
            pipelined=session.pipelining,
        )
        progress.handed_over = True
        client.send(_dot_stuffed(data) + b".\r\n")
        code, message = client.getreply()
        if code != 250:
            raise smtplib.SMTPDataError(code, message)
        return code, _text(message)
    except _BROKEN as exc:
        error = _fail(exc, session.server, progress.step)
        error.handed_over = progress.handed_over
        if isinstance(exc, smtplib.SMTPResponseException) and exc.smtp_code >= 0:
            _reset(client)
        elif isinstance(exc, AnswerTooLarge):
            client.close()
        raise error from exc


@dataclass
class _Progress:
    """How far a transaction got: the step a failure is reported at."""

    step: str = "MAIL FROM"
    handed_over: bool = False


def _envelope(
    client: smtplib.SMTP,
    envelope_from: str,
    recipients: list[str],
    options: list[str],
    handover: Handover | None,
    progress: _Progress,
    *,
    pipelined: bool,
) -> None:
    """MAIL, every RCPT and DATA, their replies read in order; returns once DATA's 354 says
    the server waits for the mail. The ``handover`` starts once MAIL FROM is written.

    One command at a time, nothing is sent whose answer cannot matter: no RCPT after a refused
    MAIL, no DATA after a refused recipient. Pipelined (RFC 2920) the commands go in groups of
    at most ``PIPELINING_GROUP_BYTES``, each group's replies read before the next is written:
    with blocking writes a larger group could leave both sides writing while neither reads
    (RFC 2920 3.1). An envelope is one group unless it has about a hundred recipients.

    Every reply sent is read before anything is decided, so the connection stays in step. If
    any was a refusal the mail is not sent: a RSET ends the transaction, but a server that
    answered DATA with 354 waits for the mail, and only closing the connection ends that without
    a delivery (no final ``.``, no mail), as the rule "all recipients or none" demands (the
    final ``.`` would deliver an empty mail to the recipients that were accepted). The caller
    then sees a closed session (:attr:`SmtpSession.closed`). A server that hangs up after
    refusing (Postfix does after too many refusals) has that refusal reported, not the lost
    connection.
    """
    commands = [("MAIL FROM", _envelope_line("FROM", envelope_from, options))]
    commands += [("RCPT TO", _envelope_line("TO", recipient, [])) for recipient in recipients]
    commands.append(("DATA", "DATA"))
    groups = _groups(commands) if pipelined else ([command] for command in commands)
    replies: list[tuple[int, bytes]] = []
    try:
        for group in groups:
            if not pipelined and _pointless(group, replies, recipients, envelope_from):
                break
            progress.step = group[0][0]
            client.send("".join(f"{line}\r\n" for _, line in group))
            if handover is not None and not replies:
                handover.start()
            for step, _ in group:
                progress.step = step
                replies.append(client.getreply())
    except (smtplib.SMTPServerDisconnected, OSError, AnswerTooLarge):
        refusal = _refusal(replies, recipients, envelope_from, hung_up=True)
        if refusal is not None:
            raise refusal from None
        raise
    refusal = _refusal(replies, recipients, envelope_from)
    if refusal is None:
        return
    if replies[-1][0] == 354:
        client.close()
    elif isinstance(refusal, smtplib.SMTPRecipientsRefused):
        _reset(client)  # the others are reset by send_transaction
    raise refusal


def _pointless(
    group: list[tuple[str, str]],
    replies: list[tuple[int, bytes]],
    recipients: list[str],
    envelope_from: str,
) -> bool:
    """One command at a time: whether the answers so far make sending ``group`` pointless."""
    refusal = _refusal(replies, recipients, envelope_from)
    return refusal is not None and (
        isinstance(refusal, smtplib.SMTPSenderRefused) or group[0][0] == "DATA"
    )


# Bytes of pipelined commands written before their replies are read: within any network's
# buffers (RFC 2920 suggests the TCP window; a client with blocking writes must stay below it).
PIPELINING_GROUP_BYTES = 4096


def _groups(commands: list[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
    group: list[tuple[str, str]] = []
    size = 0
    for command in commands:
        length = len(command[1]) + 2
        if group and size + length > PIPELINING_GROUP_BYTES:
            yield group
            group, size = [], 0
        group.append(command)
        size += length
    yield group


def _refusal(
    replies: list[tuple[int, bytes]],
    recipients: list[str],
    envelope_from: str,
    *,
    hung_up: bool = False,
) -> smtplib.SMTPException | None:
    """What the envelope's replies (MAIL, the RCPTs, DATA, as far as they came) refuse, if
    anything. ``hung_up``: the server closed the connection after them, and a 421 among them
    was its notice of that (RFC 5321 3.8), not a refusal of this mail."""

    def refuses(code: int) -> bool:
        return not (hung_up and code == 421)

    if replies and replies[0][0] != 250 and refuses(replies[0][0]):
        return smtplib.SMTPSenderRefused(*replies[0], envelope_from)
    refused = {
        recipient: reply
        for recipient, reply in zip(recipients, replies[1 : 1 + len(recipients)], strict=False)
        if reply[0] not in (250, 251) and refuses(reply[0])
    }
    if refused:
        return smtplib.SMTPRecipientsRefused(refused)
    if len(replies) == len(recipients) + 2 and replies[-1][0] != 354:
        return smtplib.SMTPDataError(*replies[-1])
    return None


def _reset(client: smtplib.SMTP) -> None:
    """RSET after a refused transaction; a server that hung up meanwhile leaves it closed."""
    try:
        client.rset()
    except _BROKEN:
        client.close()


def _dot_stuffed(data: bytes) -> bytes:
    """The mail as DATA carries it (RFC 5321 4.5.2), ending in CRLF, without the final dot."""
    # Every line starts at the beginning or after a LF: what smtplib's regex (?m)^\. finds.
    stuffed = data.replace(b"\n.", b"\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed if stuffed.endswith(b"\r\n") else stuffed + b"\r\n"


def _envelope_line(field: str, address: str, options: list[str]) -> str:
    """``MAIL FROM:<address>`` or ``RCPT TO:<address>`` without its CRLF, for an address the
    sender built itself (a bare ``local@domain``): nothing to quote, and written in one write
    with the others when pipelined. A line break is refused as smtplib's ``putcmd`` does (the
    addresses were validated long before: this is the last guard against injection)."""
    verb = "mail" if field == "FROM" else "rcpt"
    line = f"{verb} {field}:<{address}>" + "".join(f" {option}" for option in options)
    if "\r" in line or "\n" in line:
        raise ValueError(f"an SMTP command contains a line break: {line!r}")
    return line


@dataclass(frozen=True)
class SmtpProbeResult:
    capabilities: list[str]
    secure: bool
    authenticated: bool


def smtp_probe(server: EmailServer, secret: str | None, connector: Connector) -> SmtpProbeResult:
    """The SMTP connection test: connect, EHLO, STARTTLS, AUTH, NOOP. Never sends mail.

    Raises :class:`SmtpError` (with an admin-readable ``reason`` and ``category``).
    """
    session = open_session(server, secret, connector)
    try:
        code, message = session.client.noop()
        if code != 250:
            raise reply_error(code, message, "NOOP", f"{server.host}:{server.effective_port}")
        return SmtpProbeResult(session.capabilities, session.secure, session.authenticated)
    except _BROKEN as exc:
        raise _fail(exc, session.server, "NOOP") from exc
    finally:
        session.close()
