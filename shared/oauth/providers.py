"""The OAuth2 providers an operator offers to admins: presets plus the operator's own.

An admin picks a provider by name (``oauth_provider``); the operator configures it in
``MAILROOM_OAUTH_PROVIDERS`` (JSON, or the path of a JSON file), a list of objects:

``{"name", "authorize_url", "token_url", "client_id", "client_secret" |
"client_secret_encrypted", "scopes", "client_secret_expires_at", "refresh_token_lifetime_days",
"authorize_params"}``

An entry named like a preset (``microsoft365``, ``google``) only needs the client id and
secret: endpoints and scopes come from the preset (an entry may still override them, e.g. a
Microsoft tenant's own endpoints). ``scopes`` is a list, or an object per server type
(``{"imap": [...], "pop3": [...], "smtp": [...]}``). The client secret is a secret: prefer
``client_secret_encrypted`` (``mailroom encrypt-secret`` makes it with the installation's
keys), so that the plaintext never sits in a file or an environment variable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.email_servers import ServerType


class ProviderConfigError(ValueError):
    """``MAILROOM_OAUTH_PROVIDERS`` is not what it should be; the message says where."""


@dataclass(frozen=True)
class OAuthProvider:
    name: str
    authorize_url: str
    token_url: str
    scopes: dict[ServerType, tuple[str, ...]]
    client_id: str = ""
    client_secret: str = field(default="", repr=False)
    client_secret_encrypted: str = field(default="", repr=False)
    authorize_params: dict[str, str] = field(default_factory=dict)
    client_secret_expires_at: datetime | None = None
    refresh_token_lifetime_days: int | None = None

    @property
    def configured(self) -> bool:
        """A consent can start only when the operator registered a client at the provider."""
        return bool(self.client_id)

    def scope(self, server_type: ServerType) -> str:
        return " ".join(self.scopes.get(server_type, ()))


_MICROSOFT = "https://login.microsoftonline.com/common/oauth2/v2.0"
_OUTLOOK = "https://outlook.office.com"
_IDENTITY = ("openid", "email")
PRESETS: dict[str, OAuthProvider] = {
    "microsoft365": OAuthProvider(
        name="microsoft365",
        authorize_url=f"{_MICROSOFT}/authorize",
        token_url=f"{_MICROSOFT}/token",
        # openid + email: the id_token then names who signed in, checked against the user.
        scopes={
            ServerType.IMAP: (f"{_OUTLOOK}/IMAP.AccessAsUser.All", *_IDENTITY, "offline_access"),
            ServerType.POP3: (f"{_OUTLOOK}/POP.AccessAsUser.All", *_IDENTITY, "offline_access"),
            ServerType.SMTP: (f"{_OUTLOOK}/SMTP.Send", *_IDENTITY, "offline_access"),
        },
        # Microsoft ends a refresh token unused for 90 days (and rotates it on every use).
        refresh_token_lifetime_days=90,
    ),
    "google": OAuthProvider(
        name="google",
        authorize_url="https://accounts.google.com/o/oauth2/v2/auth",
        token_url="https://oauth2.googleapis.com/token",  # noqa: S106 - an address
        scopes={t: ("https://mail.google.com/", *_IDENTITY) for t in ServerType},
        # Without these Google gives no refresh token on a second consent.
        authorize_params={"access_type": "offline", "prompt": "consent"},
    ),
}


def parse_providers(raw: str) -> dict[str, OAuthProvider]:
    """The presets merged with the operator's entries (``raw``: JSON or a file path)."""
    providers = dict(PRESETS)
    raw = raw.strip()
    if not raw:
        return providers
    try:
        text = raw if raw[0] in "[{" else Path(raw).read_text(encoding="utf-8")
        entries = json.loads(text)
    except (OSError, ValueError) as exc:
        raise ProviderConfigError(f"MAILROOM_OAUTH_PROVIDERS: {exc}") from exc
    if not isinstance(entries, list):
        raise ProviderConfigError("MAILROOM_OAUTH_PROVIDERS must be a JSON list of providers")
    for index, entry in enumerate(entries):
        provider = _provider(entry, providers, f"MAILROOM_OAUTH_PROVIDERS[{index}]")
        providers[provider.name] = provider
    return providers


def _provider(entry: Any, known: dict[str, OAuthProvider], where: str) -> OAuthProvider:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
        raise ProviderConfigError(f"{where}: an object with a non-empty 'name' is required")
    name: str = entry["name"]
    base = known.get(name)
    values: dict[str, Any] = {}
    for key in ("authorize_url", "token_url", "client_id", "client_secret"):
        if key in entry:
            values[key] = _text(entry[key], f"{where}.{key}")
    if "client_secret_encrypted" in entry:
        values["client_secret_encrypted"] = _text(
            entry["client_secret_encrypted"], f"{where}.client_secret_encrypted"
        )
    if "scopes" in entry:
        values["scopes"] = _scopes(entry["scopes"], f"{where}.scopes")
    if "authorize_params" in entry:
        params = entry["authorize_params"]
        if not isinstance(params, dict):
            raise ProviderConfigError(f"{where}.authorize_params must be an object")
        values["authorize_params"] = {str(k): str(v) for k, v in params.items()}
    if entry.get("client_secret_expires_at"):
        values["client_secret_expires_at"] = _when(
            entry["client_secret_expires_at"], f"{where}.client_secret_expires_at"
        )
    if entry.get("refresh_token_lifetime_days") is not None:
        days = entry["refresh_token_lifetime_days"]
        if not isinstance(days, int) or isinstance(days, bool) or days <= 0:
            raise ProviderConfigError(f"{where}.refresh_token_lifetime_days must be a number > 0")
        values["refresh_token_lifetime_days"] = days
    if base is not None:
        return replace(base, **values)
    missing = [k for k in ("authorize_url", "token_url", "client_id", "scopes") if k not in values]
    if missing:
        raise ProviderConfigError(f"{where} ({name}): missing {', '.join(missing)}")
    return OAuthProvider(name=name, **values)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ProviderConfigError(f"{where} must be a string")
    return value


def _scopes(value: Any, where: str) -> dict[ServerType, tuple[str, ...]]:
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return {t: tuple(value) for t in ServerType}
    if isinstance(value, dict):
        scopes: dict[ServerType, tuple[str, ...]] = {}
        for key, names in value.items():
            try:
                server_type = ServerType(key)
            except ValueError:
                raise ProviderConfigError(f"{where}: {key!r} is not imap, pop3 or smtp") from None
            if not isinstance(names, list) or not all(isinstance(s, str) for s in names):
                raise ProviderConfigError(f"{where}.{key} must be a list of strings")
            scopes[server_type] = tuple(names)
        return scopes
    raise ProviderConfigError(f"{where} must be a list of strings or an object per server type")


def _when(value: Any, where: str) -> datetime:
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        raise ProviderConfigError(f"{where} must be an ISO 8601 date") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
