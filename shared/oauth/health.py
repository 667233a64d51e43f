"""How an OAuth2 server's consent is doing, before it breaks: for the config and status APIs.

Providers end consents quietly: Microsoft drops a refresh token unused for 90 days, and a
client secret registered at a provider expires on a date the operator knows. Both are shown
with the server (never a token), with a warning ``oauth_warning_days`` ahead.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from psycopg_pool import ConnectionPool

from shared.db import oauth as repo
from shared.db.pool import DictConnection
from shared.email_servers import AuthType, EmailServer
from shared.oauth.providers import OAuthProvider


@dataclass(frozen=True)
class OAuthSummary:
    """What an admin sees of a server's OAuth2 tokens (never the tokens)."""

    state: str  # consent_needed | ok | reauth_required
    reason: str | None
    consented_at: datetime | None
    access_token_expires_at: datetime | None
    refresh_token_age_days: float | None
    refresh_token_expires_at: datetime | None
    client_secret_expires_at: datetime | None
    warnings: list[str]

    def public(self) -> dict[str, object]:
        """The fields an API shows (the warnings join the server's own list)."""
        return {k: v for k, v in vars(self).items() if k != "warnings"}


class OAuthHealth:
    def __init__(
        self,
        pool: ConnectionPool[DictConnection],
        providers: dict[str, OAuthProvider],
        warning_days: int,
    ) -> None:
        self._pool = pool
        self._providers = providers
        self._warning_days = warning_days

    def summaries(self, servers: list[EmailServer]) -> dict[str, OAuthSummary]:
        oauth = [s for s in servers if s.auth_type is AuthType.OAUTH2]
        if not oauth:
            return {}
        with self._pool.connection() as conn:
            stored = repo.get_many(conn, [s.id for s in oauth])
        return {s.id: self._summary(s, stored.get(s.id)) for s in oauth}

    def _summary(self, server: EmailServer, stored: repo.StoredTokens | None) -> OAuthSummary:
        now = datetime.now(UTC)
        soon = timedelta(days=self._warning_days)
        provider = self._providers.get(server.oauth_provider or "")
        warnings: list[str] = []
        secret_expiry = provider.client_secret_expires_at if provider else None
        if secret_expiry is not None and secret_expiry - now < soon:
            verb = "expired" if secret_expiry <= now else "expires"
            warnings.append(
                f"The OAuth2 client secret of provider {provider.name if provider else '?'} "
                f"{verb} on {secret_expiry.date().isoformat()}: the operator must renew it, "
                "or token refreshes will fail."
            )
        if stored is None:
            warnings.append("Consent needed: the provider's sign-in was not completed yet.")
            return OAuthSummary(
                "consent_needed", None, None, None, None, None, secret_expiry, warnings
            )
        age_days = round((now - stored.refresh_token_issued_at).total_seconds() / 86400, 2)
        refresh_expiry = None
        if provider is not None and provider.refresh_token_lifetime_days:
            refresh_expiry = stored.refresh_token_issued_at + timedelta(
                days=provider.refresh_token_lifetime_days
            )
            if refresh_expiry - now < soon:
                warnings.append(
                    f"The refresh token is {age_days:.0f} days old and ends on "
                    f"{refresh_expiry.date().isoformat()}: re-authenticate before then."
                )
        if stored.reauth_reason:
            warnings.append(f"Consent needed again: {stored.reauth_reason}")
        return OAuthSummary(
            "reauth_required" if stored.reauth_reason else "ok",
            stored.reauth_reason,
            stored.consented_at,
            stored.expires_at,
            age_days,
            refresh_expiry,
            secret_expiry,
            warnings,
        )
