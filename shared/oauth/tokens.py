"""Fresh access tokens for OAuth2 mail servers, for every process that logs in to one.

The fetcher, the sender and the config API's connection test all ask :class:`OAuthTokens`
for a server's access token. Stored tokens are used until they are due for refresh (shortly
before they expire); then exactly one process refreshes: a lock in Redis per server keeps
several fetchers and senders from refreshing at once (a provider that rotates refresh tokens
would otherwise see the same refresh token twice and may end the consent). Whoever waited on
the lock reads the stored result instead of refreshing again. The rotated refresh token and the
new access token are stored in one statement, conditional on the version that was refreshed.

When the provider refuses the refresh token (revoked consent, expired or reused refresh token)
the server is marked ``reauth_required`` with the provider's reason; from then on every caller
gets :class:`ReauthRequired` at once, without asking the provider again, until the admin gives
consent again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import redis
from psycopg_pool import ConnectionPool

from shared import metrics
from shared.db import oauth as repo
from shared.db.pool import DictConnection
from shared.email_servers import EmailServer
from shared.mail.network_policy import NetworkPolicy
from shared.oauth.provider_client import (
    GrantRefused,
    ProviderClient,
    ProviderUnavailable,
    TokenGrant,
)
from shared.oauth.providers import OAuthProvider
from shared.redis_client import redis_client
from shared.secrets import SecretBox, SecretDecryptError
from shared.settings import Settings

log = logging.getLogger(__name__)

NO_CONSENT = "no OAuth2 consent yet: save the server to get the provider's sign-in link"


class ReauthRequired(Exception):
    """Only the admin can fix this: the provider's consent must be given (again)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class TokenUnavailable(Exception):
    """No usable access token now, but it may come by itself (provider unreachable)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def refresh_due(granted_at: datetime, expires_in: float, margin: float) -> datetime:
    """When to refresh: ``margin`` before expiry, but never earlier than half the lifetime."""
    return granted_at + timedelta(seconds=max(expires_in - margin, expires_in / 2))


class OAuthTokens:
    def __init__(
        self,
        pool: ConnectionPool[DictConnection],
        secret_box: SecretBox,
        locks: redis.Redis,
        providers: dict[str, OAuthProvider],
        *,
        redirect_uri: str,
        policy: NetworkPolicy,
        refresh_margin_seconds: float = 300.0,
        lock_seconds: float = 120.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._pool = pool
        self._secret_box = secret_box
        self._redis = locks  # refresh locks, one per server
        self.providers = providers
        self._redirect_uri = redirect_uri
        self._policy = policy
        self._margin = refresh_margin_seconds
        self._lock_seconds = lock_seconds
        self._now = clock

    @classmethod
    def from_settings(
        cls, settings: Settings, pool: ConnectionPool[DictConnection], secret_box: SecretBox
    ) -> OAuthTokens:
        return cls(
            pool,
            secret_box,
            redis_client(settings.redis_url),
            settings.oauth_provider_table,
            redirect_uri=settings.oauth_callback_url,
            policy=NetworkPolicy.from_settings(settings),
            refresh_margin_seconds=settings.oauth_refresh_margin_seconds,
        )

    def client_for(self, provider_name: str | None) -> ProviderClient:
        provider = self.providers.get(provider_name or "")
        if provider is None:
            raise TokenUnavailable(f"OAuth2 provider {provider_name!r} is not configured")
        if not provider.configured:
            raise TokenUnavailable(
                f"OAuth2 provider {provider.name!r} has no client id: the operator must register "
                "Mailroom at the provider and set it in MAILROOM_OAUTH_PROVIDERS"
            )
        return ProviderClient(provider, self._secret_box, self._redirect_uri, self._policy)

    # --- what workers call -----------------------------------------------------------------

    def access_token(self, server: EmailServer) -> str:
        """A valid access token for ``server``, refreshed first when due."""
        stored = self._read(server.id)
        if stored.reauth_reason:
            raise ReauthRequired(stored.reauth_reason)
        if self._now() < stored.refresh_due_at:
            return self._open(stored.access_token_encrypted)
        return self._refresh(server, stored)

    def rejected(self, server: EmailServer) -> None:
        """The mail server refused the token (revoked early?): refresh before the next login.

        The refresh then either yields a token that works or the provider's refusal, which
        puts the server into ``reauth_required`` within one poll. A token younger than a
        minute is not refreshed again: a login refused for another reason (IMAP switched off
        for the mailbox) must not turn every attempt into a token request.
        """
        with self._pool.connection() as conn:
            stored = repo.get(conn, server.id)
            if stored is not None:
                repo.mark_refresh_due(conn, stored)

    # --- what the consent callback calls ---------------------------------------------------

    def store_consent(self, server_id: str, provider: str, grant: TokenGrant) -> None:
        granted = self._now()
        with self._pool.connection() as conn:
            repo.store_consented(
                conn,
                server_id,
                provider,
                self._secret_box.encrypt(grant.access_token),
                self._secret_box.encrypt(grant.refresh_token) if grant.refresh_token else None,
                granted + timedelta(seconds=grant.expires_in),
                refresh_due(granted, grant.expires_in, self._margin),
            )

    # --- inside ----------------------------------------------------------------------------

    def _read(self, server_id: str) -> repo.StoredTokens:
        with self._pool.connection() as conn:
            stored = repo.get(conn, server_id)
        if stored is None:
            raise ReauthRequired(NO_CONSENT)
        return stored

    def _refresh(self, server: EmailServer, stored: repo.StoredTokens) -> str:
        lock = self._redis.lock(
            f"mailroom:oauth-refresh:{server.id}",
            timeout=self._lock_seconds,
            blocking_timeout=self._lock_seconds,
        )
        try:
            acquired = lock.acquire()
        except redis.RedisError as exc:
            raise TokenUnavailable(f"Redis unavailable for the token refresh lock: {exc}") from None
        if not acquired:
            # Someone else has been refreshing for the whole wait: use what is stored while it
            # is still valid, else report and let the caller try again later.
            stored = self._read(server.id)
            if stored.reauth_reason:
                raise ReauthRequired(stored.reauth_reason)
            if self._now() < stored.expires_at:
                return self._open(stored.access_token_encrypted)
            raise TokenUnavailable("the access token is being refreshed by another process")
        try:
            stored = self._read(server.id)  # whoever held the lock before may have refreshed
            if stored.reauth_reason:
                raise ReauthRequired(stored.reauth_reason)
            if self._now() < stored.refresh_due_at:
                return self._open(stored.access_token_encrypted)
            return self._refresh_locked(server, stored, lock)
        finally:
            try:
                lock.release()
            except redis.exceptions.LockError:
                log.warning("refresh lock of server %s expired while refreshing", server.id)
            except redis.RedisError as exc:  # it expires by itself
                log.warning("refresh lock of server %s not released: %s", server.id, exc)

    def _refresh_locked(
        self, server: EmailServer, stored: repo.StoredTokens, lock: redis.lock.Lock
    ) -> str:
        if stored.refresh_token_encrypted is None:
            return self._consent_over(
                server, stored, f"{stored.provider} gave no refresh token: give consent again"
            )
        client = self.client_for(stored.provider)
        refresh_token = self._open(stored.refresh_token_encrypted)
        granted = self._now()
        try:
            grant = client.refresh(server.type, refresh_token)
        except GrantRefused as refused:
            metrics.OAUTH_REFRESHES.labels("refused").inc()
            if not lock.owned():
                # The lock ran out while we waited on the provider: another process may have
                # refreshed with this token meanwhile, and its answer, not ours, counts.
                raise TokenUnavailable("the token refresh took too long; trying again") from None
            return self._consent_over(server, stored, refused.reason)
        except ProviderUnavailable as unavailable:
            metrics.OAUTH_REFRESHES.labels("failed").inc()
            if self._now() < stored.expires_at:  # the old token still works for a while
                log.warning("server %s: %s; using the current token", server.id, unavailable)
                return self._open(stored.access_token_encrypted)
            raise TokenUnavailable(unavailable.reason) from None
        # authlib hands back the old refresh token when the provider sent none: only a new one
        # is stored as new (its age is what the warnings watch).
        rotated = grant.refresh_token if grant.refresh_token != refresh_token else None
        with self._pool.connection() as conn:
            saved = repo.store_refreshed(
                conn,
                stored,
                self._secret_box.encrypt(grant.access_token),
                self._secret_box.encrypt(rotated) if rotated else None,
                granted + timedelta(seconds=grant.expires_in),
                refresh_due(granted, grant.expires_in, self._margin),
            )
        metrics.OAUTH_REFRESHES.labels("ok").inc()
        if saved is None:
            # A new consent was stored while we refreshed: that one wins.
            return self.access_token(server)
        log.info("server %s: access token refreshed", server.id)
        return grant.access_token

    def _consent_over(self, server: EmailServer, stored: repo.StoredTokens, reason: str) -> str:
        with self._pool.connection() as conn:
            marked = repo.mark_reauth_required(conn, stored, reason)
        if not marked:  # a new consent arrived meanwhile
            return self.access_token(server)
        log.warning("server %s needs OAuth2 consent again: %s", server.id, reason)
        raise ReauthRequired(reason)

    def _open(self, token: bytes) -> str:
        try:
            return self._secret_box.decrypt(token)
        except SecretDecryptError:
            raise ReauthRequired(
                "the stored OAuth2 tokens cannot be decrypted with the configured keys; "
                "give consent again"
            ) from None
