"""The connection test: run on every enabled save, by ``POST /email-servers/test`` and by anyone
who wants to know whether a server works with given settings.

One call does what the worker serving the server will do, through the same adapters, and stops
before any mail is touched:

- IMAP: connect, TLS or STARTTLS, login, CAPABILITY, select the inbox folder;
- POP3: connect, TLS or STLS, login, STAT;
- SMTP: connect, EHLO, STARTTLS, AUTH, NOOP (never sends mail).

Before that it checks what needs no network: an inbound server has a routing plan, the host
resolves, and it resolves to no address the installation denies (``NetworkPolicy``); the test
then connects to the address it checked (``shared.mail.connector``). The whole test is bounded
by ``timeout`` (each network step by the same limit, the total by a little more), and what the
server may send by the connector's read limits. The result names the cause in words an admin
can act on, a category for machines, and the capabilities worth showing.
"""

from __future__ import annotations

import concurrent.futures
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from imapclient import IMAPClient

from shared.contracts.status_reports import FailureCategory
from shared.email_servers import AuthType, EmailServer, ServerType
from shared.mail.connector import Connector
from shared.mail.errors import MailServerError, describe
from shared.mail.guarded_socket import AnswerTooLarge
from shared.mail.imap import ImapMailbox
from shared.mail.pop3 import Pop3Mailbox
from shared.mail.smtp import smtp_probe
from shared.mail.tls import connect_address, tls_server_name
from shared.settings import Settings

log = logging.getLogger(__name__)

NO_ROUTING_PLAN = "no routing plan linked"
NO_ACCESS_TOKEN = "no OAuth2 access token: the provider's consent is needed first"  # noqa: S105 - a message
# Extensions an admin may care about; the rest of a capability list is noise.
_SHOWN_IMAP = ("IDLE", "COMPRESS=", "STARTTLS", "AUTH=", "UTF8=", "MOVE")
_SHOWN_POP3 = ("STLS", "UIDL", "TOP", "SASL", "UTF8")
_SHOWN_SMTP = ("STARTTLS", "AUTH", "SMTPUTF8", "SIZE", "8BITMIME", "PIPELINING")


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reason: str | None
    category: FailureCategory | None = None
    capabilities: list[str] = field(default_factory=list)
    note: str | None = None
    checked_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    duration_seconds: float | None = None

    @classmethod
    def failed(cls, error: MailServerError) -> ProbeResult:
        return cls(ok=False, reason=error.reason, category=error.category)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["category"] = self.category.value if self.category else None
        data["checked_at"] = self.checked_at.isoformat()
        return data


# (server as it would be saved, its plaintext password or OAuth2 access token) -> result
Probe = Callable[[EmailServer, "str | None"], ProbeResult]

# A thread per running test; the config API bounds how many run at once (probe_concurrency).
_EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="probe")


@dataclass(frozen=True)
class ConnectionProbe:
    connector: Connector

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionProbe:
        return cls(Connector.from_settings(settings, settings.probe_timeout_seconds))

    @property
    def timeout(self) -> float:
        return self.connector.timeout

    def __call__(self, server: EmailServer, password: str | None) -> ProbeResult:
        """Test ``server`` with these settings; ``password`` is the plaintext password, or the
        access token of an OAuth2 server, never kept."""
        if server.type.inbound and not server.routing_plan_id:
            return ProbeResult(False, NO_ROUTING_PLAN, FailureCategory.NO_ROUTING_PLAN)
        started = datetime.now(UTC)
        try:
            self.connector.policy.resolve(server.host, server.effective_port)
            if server.auth_type is AuthType.OAUTH2 and not password:
                return ProbeResult(False, NO_ACCESS_TOKEN, FailureCategory.REAUTH_REQUIRED)
            future = _EXECUTOR.submit(self._talk, server, password)
            try:
                # Every network step has ``timeout``; a server that answers each step slowly
                # must still not hold the admin's request much longer than that.
                capabilities = future.result(timeout=self.timeout * 2 + 1)
            except concurrent.futures.TimeoutError:
                host, port = connect_address(server)
                raise MailServerError(
                    FailureCategory.TIMEOUT, f"no answer from {host}:{port} in time"
                ) from None
        except MailServerError as error:
            error = self._explain(server, error)
            return ProbeResult(
                ok=False,
                reason=error.reason,
                category=error.category,
                checked_at=started,
                duration_seconds=_since(started),
            )
        return ProbeResult(
            ok=True,
            reason=None,
            capabilities=capabilities,
            checked_at=started,
            duration_seconds=_since(started),
        )

    # --- per protocol ----------------------------------------------------------------------

    def _talk(self, server: EmailServer, password: str | None) -> list[str]:
        try:
            if server.type is ServerType.IMAP:
                return self._imap(server, password)
            if server.type is ServerType.POP3:
                return self._pop3(server, password)
            result = smtp_probe(server, password, self.connector)
        except MailServerError:
            raise
        except Exception as exc:  # an adapter let something through: still a readable answer
            host, port = connect_address(server)
            log.warning("probe of %s:%d failed unexpectedly: %r", host, port, exc)
            raise describe(exc, host, port, tls_server_name(server)) from exc
        shown = {
            n for c in result.capabilities if c.startswith(_SHOWN_SMTP) for n in _smtp_names(c)
        }
        if result.secure and not server.tls:
            shown.add("STARTTLS")
        return sorted(shown)

    def _imap(self, server: EmailServer, password: str | None) -> list[str]:
        mailbox = _ProbingImapMailbox(server, password, self.connector)
        try:
            mailbox.open()  # connect, TLS/STARTTLS, login, CAPABILITY, SELECT
        except MailServerError as error:
            if (
                not _over_a_limit(error)
                and error.category is FailureCategory.PROTOCOL
                and not mailbox.before_login
            ):
                raise _not_this_protocol(server) from error
            raise
        mailbox.close()
        names = mailbox.capabilities | mailbox.before_login
        if mailbox.started_tls:
            names |= {"STARTTLS"}
        return sorted(n for n in names if n.startswith(_SHOWN_IMAP))

    def _pop3(self, server: EmailServer, password: str | None) -> list[str]:
        mailbox = _ProbingPop3Mailbox(server, password, self.connector)
        mailbox.open()  # connect, TLS/STLS, USER/PASS
        try:
            mailbox.stat()
        finally:
            mailbox.close()
        names = set(mailbox.capabilities) | mailbox.before_tls
        return sorted(n for n in names if n.startswith(_SHOWN_POP3))

    def _explain(self, server: EmailServer, error: MailServerError) -> MailServerError:
        """Turn what the adapters say into what the admin should check."""
        host, port = connect_address(server)
        protocol = server.type.value.upper()
        if error.category is FailureCategory.CERTIFICATE and "not valid for" in error.reason:
            return self._explain_certificate(server, error)
        if error.category is FailureCategory.TLS and "WRONG_VERSION_NUMBER" in error.reason:
            return MailServerError(
                FailureCategory.TLS,
                f"{host}:{port} does not speak TLS on this port: check the port and the TLS box",
            )
        if _over_a_limit(error):
            return error  # the limit's reason says it all
        if error.category is FailureCategory.PROTOCOL and "port" not in error.reason:
            return MailServerError(
                FailureCategory.PROTOCOL,
                f"{error.reason} (is {host}:{port} the {protocol} port of this server?)",
            )
        return error

    def _explain_certificate(self, server: EmailServer, error: MailServerError) -> MailServerError:
        """Name what the certificate is for: "certificate is for mx.example.org, not 10.0.0.5"."""
        names = certificate_names(server, self.connector)
        if not names:
            return error
        host, port = connect_address(server)
        expected = tls_server_name(server)
        return MailServerError(
            FailureCategory.CERTIFICATE,
            f"certificate is for {', '.join(names)}, not {expected} ({host}:{port})",
        )


class _ProbingImapMailbox(ImapMailbox):
    """Also remembers what the server offered before login (AUTH=…, STARTTLS)."""

    before_login: frozenset[str] = frozenset()
    started_tls = False

    def _login(self, client: IMAPClient) -> None:
        self.before_login = frozenset(c.decode().upper() for c in client.capabilities())
        self.started_tls = bool(getattr(client, "_starttls_done", False))
        super()._login(client)


class _ProbingPop3Mailbox(Pop3Mailbox):
    """Remembers whether STLS was offered (the list after STLS omits it)."""

    before_tls: frozenset[str] = frozenset()

    def _open(self) -> None:
        super()._open()
        if self.started_tls:
            self.before_tls = frozenset({"STLS"})


def _over_a_limit(error: MailServerError) -> bool:
    """An answer cut off at a read limit (also as the SMTP error made of it)."""
    return isinstance(error, AnswerTooLarge) or isinstance(error.__cause__, AnswerTooLarge)


def _not_this_protocol(server: EmailServer) -> MailServerError:
    host, port = connect_address(server)
    protocol = server.type.value.upper()
    return MailServerError(
        FailureCategory.PROTOCOL,
        f"{host}:{port} does not answer like an {protocol} server: is this its {protocol} port?",
    )


def _smtp_names(capability: str) -> list[str]:
    """``AUTH LOGIN PLAIN`` → ``AUTH=LOGIN``, ``AUTH=PLAIN`` (named like IMAP's); ``SIZE n`` →
    ``SIZE``."""
    name, _, value = capability.partition(" ")
    if name == "AUTH":
        return [f"AUTH={mechanism}" for mechanism in value.split()]
    return [name]


def certificate_names(server: EmailServer, connector: Connector) -> list[str]:
    """The names of the certificate ``server`` presents; empty when it cannot be had.

    Only to explain a failure: the chain is not checked here, and nothing is sent but the
    protocol's STARTTLS command.
    """
    host, port = connect_address(server)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with connector.connect(server) as sock:
            sock.settimeout(min(connector.timeout, 5.0))
            if not server.tls:
                _start_tls(sock, server.type)
            with context.wrap_socket(sock, server_hostname=tls_server_name(server)) as secure:
                der = secure.getpeercert(binary_form=True)
        if der is None:
            return []
        certificate = x509.load_der_x509_certificate(der)
    except (OSError, ValueError, MailServerError) as exc:
        log.debug("certificate names of %s:%d unavailable: %s", host, port, exc)
        return []
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        common = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return [str(attribute.value) for attribute in common]
    addresses = [str(address) for address in san.get_values_for_type(x509.IPAddress)]
    return [*san.get_values_for_type(x509.DNSName), *addresses]


def _start_tls(sock: socket.socket, server_type: ServerType) -> None:
    """The plain-text part of STARTTLS / STLS, just far enough for a TLS handshake."""
    stream = sock.makefile("rb", buffering=0)

    def reply(done: Callable[[bytes], bool]) -> bytes:
        while True:
            line = stream.readline(4096)
            if not line:
                raise ConnectionError("closed during STARTTLS")
            if done(line):
                return line

    if server_type is ServerType.IMAP:
        reply(lambda line: True)
        sock.sendall(b"P STARTTLS\r\n")
        answer = reply(lambda line: line.startswith(b"P "))
        ok = answer.startswith(b"P OK")
    elif server_type is ServerType.POP3:
        reply(lambda line: True)
        sock.sendall(b"STLS\r\n")
        ok = reply(lambda line: True).startswith(b"+OK")
    else:
        last = lambda line: line[3:4] != b"-"  # noqa: E731 - SMTP's final reply line
        reply(last)
        sock.sendall(b"EHLO mailroom.probe\r\n")
        reply(last)
        sock.sendall(b"STARTTLS\r\n")
        ok = reply(last).startswith(b"220")
    if not ok:
        raise ConnectionError("STARTTLS refused")


def _since(started: datetime) -> float:
    return round((datetime.now(UTC) - started).total_seconds(), 3)
