"""Which SMTP server sends a command, and as whom (REQUIREMENTS: Outbound mail, Template mail).

Resolution looks only at the command's tenant and only at enabled SMTP servers, from the
sender's :class:`~shared.server_directory.ServerDirectory` (config events keep it current
within a second). Addresses compare case-insensitively.

- ``agent`` with ``from``: the agent-role server whose user (when it is an email address) or
  additional sender addresses contain ``from``.
- ``agent`` without ``from``, replying to a fetched mail (``in_reply_to`` = its Message-ID):
  the address that mail was sent to (``inbound_messages``), then as above.
- ``agent`` without ``from`` otherwise: the one agent-role server whose user is an email
  address; several candidates are a clear failure, never a guess.
- ``template``: the designated template server (as ``from`` when given and one of its
  addresses, else its user or first sender address); none designated (or it is disabled):
  the system default SMTP server from the settings, always as one of the system's own
  addresses: a ``from`` that is not one of them is replaced by the system's sender address
  (the system's relay never sends as whatever a command names).

Anything else raises :class:`NoRoute` with a reason fit for the requester
("no SMTP server for sender …").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from psycopg_pool import ConnectionPool

from shared.contracts.send import SendCommand, address_of
from shared.db import inbound_messages
from shared.db.pool import DictConnection
from shared.email_servers import AuthType, EmailServer, Role, ServerType
from shared.login_secrets import decrypt_password
from shared.mail.errors import MailServerError
from shared.secrets import SecretBox
from shared.server_directory import ServerDirectory
from shared.settings import Settings

log = logging.getLogger(__name__)

SYSTEM_DEFAULT_ID = "system-default"
ROUTES_KEPT = 10_000


class UnreadablePassword(Exception):
    """The server that owns the sender address has a password no configured key opens: the
    command waits (a temporary failure of that server), the admin is told."""

    def __init__(self, server: EmailServer, error: MailServerError) -> None:
        super().__init__(error.reason)
        self.server = server
        self.error = error


class NoRoute(Exception):
    """No server may send this command (a final failure); ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Route:
    server: EmailServer
    from_mailbox: str  # the From header (may carry a display name)
    password: str | None = field(repr=False)  # or an OAuth2 access token
    system_default: bool = False

    @property
    def server_id(self) -> str | None:
        return None if self.system_default else self.server.id


def is_email(value: str) -> bool:
    local, at, domain = value.strip().rpartition("@")
    return bool(at and local and "." in domain.strip(".") and " " not in value.strip())


def sender_addresses(server: EmailServer) -> list[str]:
    """The addresses a server may send as: its user (if an email address), then the extra ones."""
    found = [server.username] if is_email(server.username) else []
    return found + [a for a in server.sender_addresses if a]


def system_default_server(settings: Settings) -> EmailServer | None:
    if not settings.default_smtp_host:
        return None
    return EmailServer(
        id=SYSTEM_DEFAULT_ID,
        tenant_id="",  # the operator's own (EmailServer.operators_own)
        type=ServerType.SMTP,
        name="system default SMTP server",
        host=settings.default_smtp_host,
        port=settings.default_smtp_port,
        tls=settings.default_smtp_tls,
        auth_type=AuthType.BASIC,
        enabled=True,
        version=0,
        username=settings.default_smtp_username,
        sni_hostname=settings.default_smtp_sni_hostname or None,
        role=Role.TEMPLATE,
    )


class Resolver:
    def __init__(
        self,
        settings: Settings,
        directory: ServerDirectory,
        pool: ConnectionPool[DictConnection],
        secrets: SecretBox,
    ) -> None:
        self._settings = settings
        self._directory = directory
        self._pool = pool
        self._secrets = secrets
        # Decrypting a password (Fernet) for every mail is needless work: kept per server
        # version, as the pooled connections logged in with it are.
        self._passwords: dict[tuple[str, int], tuple[bytes, str]] = {}
        # Routes found at the directory's current generation, by what decides them. Resolving
        # anew scans every server of the directory, once when a mail is prepared and once more
        # in its turn on the SMTP connection (to notice an admin's edit in between), the second
        # time between the server's reply to one mail and the next MAIL FROM.
        # One tuple, replaced whole: a thread reads generation and routes together.
        self._routes: tuple[int, dict[tuple[str, str, str | None], Route]] = (-1, {})

    def resolve(self, command: SendCommand) -> Route:
        """The route for ``command``; raises :class:`NoRoute`. Follows every server change
        the directory has applied (its ``generation``)."""
        # A reply without ``from`` asks the database which address the mail was sent to.
        from_database = command.kind == "agent" and command.from_ is None and command.in_reply_to
        if from_database:
            return self._resolve(command)
        generation = self._directory.generation  # read before the servers are
        known, routes = self._routes
        if known != generation or len(routes) > ROUTES_KEPT:
            routes = {}
            self._routes = (generation, routes)
        key = (command.tenant_id, command.kind, command.from_)
        route = routes.get(key)
        if route is None:
            # Found from servers at this generation or a newer one; kept under this one,
            # which is current only as long as no server changed.
            route = self._resolve(command)
            routes[key] = route
        return route

    def _resolve(self, command: SendCommand) -> Route:
        servers = [
            s
            for s in self._directory.all()
            if s.tenant_id == command.tenant_id and s.type is ServerType.SMTP and s.enabled
        ]
        if command.kind == "template":
            return self._template(command, servers)
        return self._agent(command, servers)

    # --- agent mail ------------------------------------------------------------------------

    def _agent(self, command: SendCommand, servers: list[EmailServer]) -> Route:
        agents = sorted(
            (s for s in servers if s.role in (None, Role.AGENT)), key=lambda s: s.name.lower()
        )
        from_mailbox = command.from_
        if from_mailbox is None and command.in_reply_to:
            with self._pool.connection() as conn:
                inbound = inbound_messages.find(conn, command.tenant_id, command.in_reply_to)
            if inbound is not None:
                from_mailbox = inbound.mailbox
                if not is_email(from_mailbox):
                    raise NoRoute(
                        f"no SMTP server for sender {from_mailbox!r}: the mail being answered "
                        "was sent to a mailbox whose user is not an email address"
                    )
        if from_mailbox is not None:
            wanted = address_of(from_mailbox).casefold()
            matches = [s for s in agents if wanted in (a.casefold() for a in sender_addresses(s))]
            if not matches:
                raise NoRoute(f"no SMTP server for sender {address_of(from_mailbox)}")
            if len(matches) > 1:
                names = ", ".join(repr(s.name) for s in matches)
                raise NoRoute(
                    f"several SMTP servers may send as {address_of(from_mailbox)} ({names}); "
                    "an admin must keep the address on one server only"
                )
            return self._route(matches[0], from_mailbox)
        candidates = [s for s in agents if is_email(s.username)]
        if not candidates:
            raise NoRoute(
                "no SMTP server for sender (none given): no enabled agent SMTP server whose "
                "user is an email address"
            )
        if len(candidates) > 1:
            names = ", ".join(repr(s.name) for s in candidates)
            raise NoRoute(
                f"no from address given and several SMTP servers could send ({names}); "
                "name the sender address in 'from'"
            )
        return self._route(candidates[0], candidates[0].username)

    # --- template mail ---------------------------------------------------------------------

    def _template(self, command: SendCommand, servers: list[EmailServer]) -> Route:
        designated = [s for s in servers if s.is_template_server]
        if designated:
            server = designated[0]
            addresses = sender_addresses(server)
            if command.from_ is not None:
                wanted = address_of(command.from_).casefold()
                if wanted not in (a.casefold() for a in addresses):
                    raise NoRoute(
                        f"no SMTP server for sender {address_of(command.from_)}: it is not an "
                        f"address of the template server {server.name!r}"
                    )
                return self._route(server, command.from_)
            if not addresses:
                raise NoRoute(
                    f"no SMTP server for sender (none given): the template server "
                    f"{server.name!r} has no sender address"
                )
            return self._route(server, addresses[0])
        default = system_default_server(self._settings)
        if default is None:
            raise NoRoute(
                "no SMTP server for template mail: the company designated no template server "
                "and no system default SMTP server is configured"
            )
        from_mailbox = self._system_from(command.from_, default)
        if not from_mailbox:
            raise NoRoute(
                "no SMTP server for sender (none given): the system default SMTP "
                "server has no sender address configured"
            )
        password = self._settings.default_smtp_password.get_secret_value() or None
        return Route(default, from_mailbox, password, system_default=True)

    def _system_from(self, wanted: str | None, default: EmailServer) -> str:
        """The system's sender address, or ``wanted`` when it is one of the system's own."""
        settings = self._settings
        own = [settings.default_smtp_from] if settings.default_smtp_from else []
        own += sender_addresses(replace(default, sender_addresses=()))  # its user, if an address
        own += [a.strip() for a in settings.default_smtp_sender_addresses.split(",") if a.strip()]
        if wanted is not None:
            if address_of(wanted).casefold() in (address_of(a).casefold() for a in own):
                return wanted
            log.info(
                "template 'from' %s is not an address of the system default SMTP server; "
                "sent as the system's address",
                address_of(wanted),
            )
        return own[0] if own else ""

    def _route(self, server: EmailServer, from_mailbox: str) -> Route:
        return Route(server, from_mailbox, self._password(server))

    def _password(self, server: EmailServer) -> str | None:
        encrypted = server.password_encrypted
        if encrypted is None:
            return None
        key = (server.id, server.version)
        known = self._passwords.get(key)
        if known is not None and known[0] == encrypted:
            return known[1]
        try:
            password = decrypt_password(self._secrets, encrypted)
        except MailServerError as exc:
            raise UnreadablePassword(server, exc) from exc
        if len(self._passwords) > 1000:
            self._passwords.clear()
        self._passwords[key] = (encrypted, password)
        return password
