"""The one settings object of every Mailroom service.

Every key is read from an environment variable prefixed ``MAILROOM_`` and has a default that
works on a developer machine with the local RabbitMQ, PostgreSQL and Redis. The README's
configuration table is the documentation of these fields; keep the two in step.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from functools import cached_property
from pathlib import Path

from cryptography.fernet import Fernet
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.contracts.send_limits import DEFAULT_LIMITS as DEFAULT_SEND_LIMITS
from shared.mail.network_policy import DENIED_BY_DEFAULT
from shared.oauth.providers import OAuthProvider, parse_providers

log = logging.getLogger(__name__)


class KeysMissing(Exception):
    """No encryption or signing keys are configured, and none may be generated."""


class Settings(BaseSettings):
    """All configuration; construct once per process with :func:`get_settings`."""

    model_config = SettingsConfigDict(env_prefix="MAILROOM_", frozen=True, extra="ignore")

    # URLs may hold passwords: kept out of repr() so a logged Settings shows none.
    amqp_url: str = Field(default="amqp://guest:guest@127.0.0.1:5672/%2F", repr=False)
    database_url: str = Field(default="postgresql://postgres@127.0.0.1:5432/mailroom", repr=False)
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", repr=False)
    ca_bundle: Path | None = Field(
        default=None, description="PEM file of extra CA certificates trusted for mail servers."
    )

    secret_keys: str = Field(
        default="",
        repr=False,
        description="Fernet keys that encrypt stored secrets, comma-separated, newest first. "
        "The first encrypts; all decrypt (key rotation).",
    )
    token_signing_key: str = Field(
        default="", repr=False, description="HMAC key that signs and verifies bearer tokens."
    )
    state_dir: Path = Field(
        default=Path("var"),
        description="Where development keys live when the two keys above are unset.",
    )
    generate_dev_keys: bool = Field(
        default=False,
        description="Create development keys in state_dir when none exist (make run does). "
        "Off by default, so a container started without keys refuses to run instead of "
        "inventing keys of its own that no other container shares.",
    )

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    status_host: str = "127.0.0.1"
    status_port: int = 8001

    probe_timeout_seconds: float = 10.0
    probe_concurrency: int = Field(
        default=8,
        ge=1,
        description="Connection tests the config API runs at once, all tenants together; a "
        "test beyond it is answered 429 with Retry-After.",
    )
    probe_concurrency_per_tenant: int = Field(
        default=2,
        ge=1,
        description="Connection tests one tenant may run at once (within probe_concurrency), "
        "so that one tenant cannot hold back another's saves; beyond it: 429 with Retry-After.",
    )
    denied_networks: str = Field(
        default=DENIED_BY_DEFAULT,
        description="Comma-separated networks Mailroom never connects to for a tenant (mail "
        "servers, OAuth2 token endpoints). Default: loopback, link-local, private, CGNAT, ULA, "
        "0.0.0.0/8, multicast and reserved ranges.",
    )
    allowed_networks: str = Field(
        default="",
        description="Comma-separated networks allowed even though denied above, e.g. an "
        "on-premises mail server's (make run and the tests allow loopback).",
    )
    mail_answer_max_bytes: int = Field(
        default=1024 * 1024,
        description="Most a mail server may send in answer to one command (a greeting, a "
        "reply); a fetched mail may be as large as max_mail_bytes.",
    )
    outbox_poll_seconds: float = 1.0
    config_resync_seconds: float = 300.0
    default_token_ttl_seconds: int = 24 * 3600

    oauth_providers: str = Field(
        default="",
        description="JSON list of OAuth2 providers, or the path of a JSON file "
        "(shared/oauth/providers.py says what an entry holds).",
    )
    oauth_redirect_url: str = Field(
        default="",
        description="Where the provider sends the admin's browser after consent: the config "
        "API's /api/v1/oauth/callback as the browser reaches it (default: on api_host:api_port).",
    )
    oauth_refresh_margin_seconds: float = Field(
        default=300.0,
        description="An access token is refreshed this long before it expires (at most half "
        "its lifetime before).",
    )
    oauth_consent_seconds: float = Field(
        default=1800.0, description="How long an authorization URL stays usable."
    )
    oauth_warning_days: int = Field(
        default=14,
        description="Warn this many days before a refresh token or a client secret expires.",
    )
    log_level: str = "INFO"

    # --- fetcher ---------------------------------------------------------------------------
    imap_poll_seconds: float = Field(
        default=60.0, description="IMAP poll interval where the server has no IDLE."
    )
    pop3_poll_seconds: float = Field(default=20.0, description="POP3 poll interval.")
    imap_idle_renew_seconds: float = Field(
        default=600.0,
        description="IDLE is ended and started again after this long (servers drop it after "
        "29 minutes, RFC 2177); mail is also fetched then.",
    )
    fetch_batch_mails: int = Field(
        default=250, description="Mails per published batch (one AMQP transaction each)."
    )
    fetch_batch_bytes: int = Field(
        default=16 * 1024 * 1024, description="Bytes per published batch (at least one mail)."
    )
    max_mail_bytes: int = Field(
        default=50 * 1024 * 1024,
        description="A larger mail is not handed over: its header block and the reason go to "
        "the quarantine queue, and the mail stays on the server (flagged, not deleted).",
    )
    mail_server_timeout_seconds: float = Field(
        default=60.0, description="Limit of each network operation with a mail server."
    )
    fetch_retry_max_seconds: float = Field(
        default=300.0, description="Longest wait between attempts after a mailbox failed."
    )
    fetch_publisher_threads: int = Field(
        default=2, description="Connections a fetcher process publishes mail through."
    )
    mailbox_lease_seconds: float = Field(
        default=15.0,
        description="A mailbox is served by one fetcher at a time; a dead fetcher's mailboxes "
        "are taken over after this long.",
    )

    # --- sender (issue 4) ------------------------------------------------------------------
    sender_threads: int = Field(
        default=32,
        description="Most threads per sender process for first attempts, all servers' lanes "
        "together; a server's lane has at most sender_connections_per_server of them.",
    )
    sender_lane_queue_limit: int = Field(
        default=50,
        description="Commands waiting in one server's lane; more wait as retries (acked), so "
        "one server's backlog never fills the broker's prefetch.",
    )
    sender_slot_wait_seconds: float = Field(
        default=10.0,
        description="Longest wait for a free connection to a server; then the mail is retried "
        "later.",
    )
    sender_rate_limit_wait_seconds: float = Field(
        default=10.0,
        description="Longest wait for the rate limit; then the mail is retried later.",
    )
    send_publishers: str = Field(
        default="",
        description='JSON {"<rabbitmq user>": ["<tenant>", ...] or ["*"]}: who may publish send '
        "commands for which tenants, by the message's user_id (CONTRACT). Empty: everyone "
        "RabbitMQ lets write to mailroom.send.",
    )
    sender_retry_deadline_seconds: float = Field(
        default=2 * 24 * 3600.0,
        description="A temporarily failing send (SMTP 4xx, timeout, connection error) is "
        "retried until this long after the command arrived, then failed for good.",
    )
    sender_retry_min_backoff_seconds: float = Field(
        default=60.0,
        description="First retry delay; each further retry doubles it, with jitter.",
    )
    sender_retry_max_backoff_seconds: float = Field(
        default=3600.0, description="Longest delay between two attempts."
    )
    sender_rate_per_minute: float = Field(
        default=0.0,
        description="Mails per minute per SMTP server, shared by every sender process "
        "(a token bucket in Redis); over the limit a send waits (then is retried). 0 = none.",
    )
    sender_rate_burst: int = Field(
        default=1, description="Mails a server may take at once before the rate limit applies."
    )
    sender_connections_per_server: int = Field(
        default=2, description="Open SMTP connections per server and sender process (the cap)."
    )
    sender_idle_close_seconds: float = Field(
        default=30.0, description="An SMTP connection unused this long is closed (QUIT)."
    )
    sender_smtp_timeout_seconds: float = Field(
        default=60.0, description="Limit of each SMTP network operation (connect, each reply)."
    )
    sender_status_report_seconds: float = Field(
        default=5.0,
        description="How often the sender sends each SMTP server's counters to the status "
        "service; a change between ok and failing is sent at once.",
    )
    # A command over one of these limits is answered failed (the reason names the limit) and
    # kept in mailroom.send.dead; shared/contracts/send_limits.py checks them.
    send_max_command_bytes: int = Field(
        default=DEFAULT_SEND_LIMITS.command_bytes,
        ge=1,
        description="Largest send command, in bytes of its AMQP body; checked before the JSON "
        "is parsed. Base64 makes an attachment a third larger than its file.",
    )
    send_max_attachments: int = Field(
        default=DEFAULT_SEND_LIMITS.attachments,
        ge=0,
        description="Most attachments in one send command.",
    )
    send_max_attachment_bytes: int = Field(
        default=DEFAULT_SEND_LIMITS.attachment_bytes,
        ge=0,
        description="Largest attachment, in bytes of its file (decoded), computed from the "
        "length of its base64 text.",
    )
    send_max_recipients: int = Field(
        default=DEFAULT_SEND_LIMITS.recipients,
        ge=1,
        description="Most recipients of one send command: to, cc and bcc together.",
    )
    send_max_headers: int = Field(
        default=DEFAULT_SEND_LIMITS.headers,
        ge=0,
        description="Most custom headers (the command's headers) in one send command.",
    )
    send_max_header_bytes: int = Field(
        default=DEFAULT_SEND_LIMITS.header_bytes,
        ge=1,
        description="Longest custom header: its name and value together, in UTF-8 bytes.",
    )
    default_smtp_host: str = Field(
        default="",
        description="The system's default SMTP server, for template mail of a company that "
        "designated no template server. Empty = none.",
    )
    default_smtp_port: int | None = Field(
        default=None, description="Its port (empty: 465 with TLS, else 587)."
    )
    default_smtp_tls: bool = Field(
        default=False, description="Implicit TLS; otherwise STARTTLS when offered."
    )
    default_smtp_sni_hostname: str = Field(
        default="", description="TLS name to check, when the host is an IP address."
    )
    default_smtp_username: str = Field(default="", description="Login user; empty = no AUTH.")
    default_smtp_password: SecretStr = Field(
        default=SecretStr(""), description="Login password of the default SMTP server."
    )
    default_smtp_from: str = Field(
        default="", description="Sender address of template mail sent through the default server."
    )
    default_smtp_sender_addresses: str = Field(
        default="",
        description="Further addresses (comma-separated) a template command may name as its "
        "'from' through the default server; any other 'from' is replaced by default_smtp_from.",
    )

    # --- status (issue 5) ------------------------------------------------------------------
    status_failures_before_failing: int = Field(
        default=2,
        ge=1,
        description="Consecutive failed reports before a server counts as failing (and the "
        "alert goes out); one failure alone does not flap the state.",
    )
    status_stale_factor: float = Field(
        default=3.0,
        gt=1.0,
        description="An enabled inbound server is stale when no worker reported on it for "
        "this many of its report intervals (a dead fetcher shows up by itself).",
    )
    status_streams: int = Field(
        default=1000,
        ge=1,
        description="Live status streams (server-sent events) one status-service process "
        "serves at once, all tenants together; all share one Redis connection. Beyond it: 429 "
        "with Retry-After.",
    )
    status_streams_per_tenant: int = Field(
        default=20,
        ge=1,
        description="Live status streams one tenant may hold open at once per status-service "
        "process; beyond it: 429 with Retry-After.",
    )
    status_heartbeat_seconds: float = Field(
        default=60.0,
        description="A fetcher reports on a healthy mailbox at least this often, also while "
        "it waits in IDLE; the report interval of IMAP is min(imap poll, this).",
    )
    metrics_host: str = Field(
        default="127.0.0.1", description="Where the fetcher and sender serve /metrics."
    )
    fetcher_metrics_port: int = Field(
        default=9101, description="The fetcher's /metrics port; 0 = no metrics endpoint."
    )
    sender_metrics_port: int = Field(
        default=9102, description="The sender's /metrics port; 0 = no metrics endpoint."
    )
    sender_retry_threads: int = Field(
        default=2,
        description="Threads per sender process that make retries (dramatiq worker threads); "
        "first attempts run in the servers' lanes (MAILROOM_SENDER_THREADS).",
    )

    @cached_property
    def _dev_keys(self) -> dict[str, str]:
        path = self.state_dir / "dev-keys.json"
        if not path.exists() and not self.generate_dev_keys:
            raise KeysMissing(
                "MAILROOM_SECRET_KEYS and MAILROOM_TOKEN_SIGNING_KEY are not set. Set them (see "
                "the README, Configuration), or on a development machine run `make run` once, "
                f"which creates development keys in {path}."
            )
        return _load_or_create_dev_keys(path)

    def check_keys(self) -> None:
        """Raise :class:`KeysMissing` now rather than on the first secret or token."""
        _ = self.fernet_keys, self.token_key

    @property
    def fernet_keys(self) -> list[str]:
        """Encryption keys, the newest (the one that encrypts) first."""
        raw = self.secret_keys or self._dev_keys["secret_keys"]
        return [key.strip() for key in raw.split(",") if key.strip()]

    @property
    def token_key(self) -> str:
        return self.token_signing_key or self._dev_keys["token_signing_key"]

    @property
    def oauth_provider_table(self) -> dict[str, OAuthProvider]:
        """The presets merged with the operator's ``MAILROOM_OAUTH_PROVIDERS``."""
        return parse_providers(self.oauth_providers)

    @property
    def oauth_callback_url(self) -> str:
        """Where the provider sends the admin's browser back; a wildcard listen address
        (a container's 0.0.0.0) is no address a browser can open."""
        host = "127.0.0.1" if self.api_host in ("0.0.0.0", "::", "") else self.api_host  # noqa: S104
        return self.oauth_redirect_url or f"http://{host}:{self.api_port}/api/v1/oauth/callback"


def _load_or_create_dev_keys(path: Path) -> dict[str, str]:
    """Keys for a developer machine, so that ``make run`` works with nothing configured.

    Production sets ``MAILROOM_SECRET_KEYS`` and ``MAILROOM_TOKEN_SIGNING_KEY``; then this file is
    never read. The file is private to its owner and never committed (``var/`` is ignored).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = {
        "secret_keys": Fernet.generate_key().decode(),
        "token_signing_key": secrets.token_urlsafe(48),
    }
    try:
        # O_EXCL: when several services start at once, exactly one writes the keys.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # the writer may not have finished yet
            text = path.read_text(encoding="utf-8")
            if text:
                existing: dict[str, str] = json.loads(text)
                return existing
            time.sleep(0.05)
        raise RuntimeError(f"{path} stays empty; remove it to generate new keys") from None
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        json.dump(keys, file)
    log.warning("generated development keys in %s (set MAILROOM_SECRET_KEYS in production)", path)
    return keys


_settings: Settings | None = None


def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    global _settings  # noqa: PLW0603 - one settings object per process, by design
    if _settings is None:
        _settings = Settings()
    return _settings
