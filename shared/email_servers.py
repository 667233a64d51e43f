"""What a mail server is, as every service sees it.

The config API writes these rows; the fetcher, sender and status services read them. The
password stays encrypted in this object: only the code that logs in to the mail server opens
it, through :class:`shared.secrets.SecretBox`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class ServerType(StrEnum):
    POP3 = "pop3"
    IMAP = "imap"
    SMTP = "smtp"

    @property
    def inbound(self) -> bool:
        return self is not ServerType.SMTP


class AuthType(StrEnum):
    BASIC = "basic"
    OAUTH2 = "oauth2"


class Role(StrEnum):
    AGENT = "agent"
    TEMPLATE = "template"


# (type, tls) -> port used when the admin leaves the port empty. SMTP without TLS means
# submission with STARTTLS (587), with TLS implicit "submissions" (465, RFC 8314).
DEFAULT_PORTS: dict[tuple[ServerType, bool], int] = {
    (ServerType.IMAP, True): 993,
    (ServerType.IMAP, False): 143,
    (ServerType.POP3, True): 995,
    (ServerType.POP3, False): 110,
    (ServerType.SMTP, True): 465,
    (ServerType.SMTP, False): 587,
}

DEFAULT_INBOX_FOLDER = "INBOX"

# The settings that decide whether and how a connection to the server works (columns; the
# password is kept apart as ``password_encrypted``). The config API tests a change to any of
# them before saving an enabled server; the status service starts over at ``connecting``.
CONNECTION_SETTINGS: tuple[str, ...] = (
    "host",
    "port",
    "tls",
    "auth_type",
    "username",
    "inbox_folder",
    "sni_hostname",
    "disable_compression",
    "routing_plan_id",
    "oauth_provider",
)


def effective_port(server_type: ServerType, tls: bool, port: int | None) -> int:
    return port if port is not None else DEFAULT_PORTS[(server_type, tls)]


@dataclass(frozen=True)
class EmailServer:
    """One configured mail server of one tenant (a row of ``email_servers``)."""

    id: str
    tenant_id: str
    type: ServerType
    name: str
    host: str
    tls: bool
    auth_type: AuthType
    enabled: bool
    version: int
    description: str | None = None
    port: int | None = None
    username: str = ""
    password_encrypted: bytes | None = field(default=None, repr=False)
    reauthenticate_on_save: bool = False
    inbox_folder: str | None = None
    sni_hostname: str | None = None
    disable_compression: bool | None = None
    routing_plan_id: str | None = None
    sender_addresses: tuple[str, ...] = ()
    role: Role | None = None
    is_template_server: bool = False
    oauth_provider: str | None = None
    last_connection: dict[str, Any] | None = None
    starttls_seen_at: str | None = None  # "host:port" where a connection test saw STARTTLS
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def effective_port(self) -> int:
        return effective_port(self.type, self.tls, self.port)

    @property
    def operators_own(self) -> bool:
        """A server the operator configured (the system default SMTP server), not a tenant:
        it belongs to no tenant, and the network policy does not apply to it."""
        return not self.tenant_id

    @property
    def place(self) -> str:
        """Where connections go: ``host:port`` (what a STARTTLS pin is tied to)."""
        return f"{self.host}:{self.effective_port}"

    @property
    def requires_tls(self) -> bool:
        """Credentials go only over TLS: the TLS box is checked, or a connection test saw this
        host and port offer STARTTLS (a server that stops offering it is not trusted)."""
        return self.tls or self.starttls_seen_at == self.place

    @property
    def has_password(self) -> bool:
        return self.password_encrypted is not None
