"""The OAuth2 consent: from an admin's save to tokens stored and the connection tested.

1. A save of an OAuth2 server that needs consent (no tokens yet, tokens the provider refused,
   another mailbox, provider or host, or ``reauthenticate_on_save``) starts one: a random ``state``
   and a PKCE verifier are stored, bound to the admin, the tenant and the server, and the
   answer carries the provider's authorization URL.
2. The admin's browser signs in at the provider, which redirects to the callback with
   ``code`` and ``state``. The state is used up (one callback per consent, within
   ``oauth_consent_seconds``), the code exchanged with the verifier, the tokens stored
   encrypted, and the connection tested with the new access token.
3. The server's version grows with the consent, so the fetcher or sender serving it starts
   over with the new tokens (config event ``email_server.updated``, field ``oauth_consent``).

The contact center never sees the mailbox password: it stays between the admin and the
provider.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from psycopg_pool import ConnectionPool

from shared.db import email_servers as servers_repo
from shared.db import oauth as repo
from shared.db.pool import DictConnection
from shared.email_servers import AuthType, EmailServer
from shared.oauth.provider_client import GrantRefused, ProviderUnavailable
from shared.oauth.tokens import OAuthTokens, ReauthRequired, TokenUnavailable
from shared.probe import Probe, ProbeResult
from shared.secrets import SecretBox, SecretDecryptError

CONSENT_FIELD = "oauth_consent"  # named in the audit trail and the config event
# What a state this module hands out looks like (token_urlsafe); anything else names no
# consent and is never looked up.
_STATE = re.compile(r"[A-Za-z0-9_-]{1,128}")


def same_account(before: EmailServer, after: EmailServer) -> bool:
    """Tokens belong to one mailbox at one provider, and are sent to the host they were given
    for: another user, provider or host needs a new consent (an access token is a password
    for as long as it lives; a host of someone else's choosing would read it)."""
    return (before.auth_type, before.username, before.oauth_provider, before.host) == (
        after.auth_type,
        after.username,
        after.oauth_provider,
        after.host,
    )


class ConsentUnavailable(Exception):
    """A consent cannot start (the operator has not registered a client at the provider)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class ConsentOutcome:
    """What the admin's browser is told after the provider sent it back."""

    ok: bool
    message: str
    server_id: str | None = None
    connection: ProbeResult | None = None
    note: str | None = None  # what the admin should know even when it worked


class OAuthConsents:
    def __init__(
        self,
        pool: ConnectionPool[DictConnection],
        secret_box: SecretBox,
        tokens: OAuthTokens,
        *,
        consent_seconds: float,
    ) -> None:
        self._pool = pool
        self._secret_box = secret_box
        self.tokens = tokens
        self._consent_seconds = consent_seconds

    # --- on save ---------------------------------------------------------------------------

    def has_usable_tokens(self, server: EmailServer, before: EmailServer | None) -> bool:
        """Tokens a connection test can use: stored, not refused, of this very mailbox."""
        if before is None or not same_account(before, server):
            return False
        with self._pool.connection() as conn:
            stored = repo.get(conn, server.id)
        return stored is not None and stored.reauth_reason is None

    def access_token_for_test(self, server: EmailServer) -> str | None:
        """The stored consent's access token for a connection test; ``None`` when there is
        none to use (the test then says so)."""
        try:
            return self.tokens.access_token(server)
        except (ReauthRequired, TokenUnavailable):
            return None

    def start(self, admin: str, server: EmailServer) -> str:
        """Store a new consent for ``server`` and return the provider's authorization URL."""
        try:
            client = self.tokens.client_for(server.oauth_provider)
            client.check()
        except (TokenUnavailable, ProviderUnavailable) as exc:
            raise ConsentUnavailable(exc.reason) from None
        state = secrets.token_urlsafe(32)
        verifier = secrets.token_urlsafe(64)  # 86 characters, within RFC 7636's 43..128
        with self._pool.connection() as conn:
            repo.start_consent(
                conn,
                state=state,
                tenant_id=server.tenant_id,
                server_id=server.id,
                admin=admin,
                provider=client.provider.name,
                username=server.username,
                code_verifier=self._secret_box.encrypt(verifier),
                expires_at=datetime.now(UTC) + timedelta(seconds=self._consent_seconds),
            )
        return client.authorization_url(
            server.type, state=state, code_verifier=verifier, login_hint=server.username
        )

    # --- the callback ----------------------------------------------------------------------

    def finish(
        self, state: str, code: str | None, error: str | None, error_description: str | None
    ) -> tuple[repo.StartedConsent | None, EmailServer | None, ConsentOutcome]:
        """Use up the consent named by ``state`` and exchange ``code`` for tokens.

        Returns the consent, the server as stored, and the outcome so far; the caller tests
        the connection and records the change.
        """
        with self._pool.connection() as conn:
            consent = repo.take_consent(conn, state) if _STATE.fullmatch(state) else None
            server = (
                servers_repo.get(conn, consent.server_id, tenant_id=consent.tenant_id)
                if consent
                else None
            )
        if consent is None:
            return (
                None,
                None,
                ConsentOutcome(
                    False,
                    "This sign-in link has expired or was already used. Save the mail server again "
                    "(or ask for a new link) to start over.",
                ),
            )
        if error:
            detail = f"{error}" + (f": {error_description}" if error_description else "")
            return (
                consent,
                server,
                ConsentOutcome(
                    False, f"The provider did not grant access ({detail}).", consent.server_id
                ),
            )
        if (
            server is None
            or server.auth_type is not AuthType.OAUTH2
            or (server.oauth_provider, server.username) != (consent.provider, consent.username)
        ):
            return (
                consent,
                None,
                ConsentOutcome(
                    False,
                    "The mail server was deleted or changed while you signed in; start over.",
                    consent.server_id,
                ),
            )
        if not code:
            return (
                consent,
                server,
                ConsentOutcome(False, "The provider sent no authorization code.", server.id),
            )
        try:
            verifier = self._secret_box.decrypt(consent.code_verifier_encrypted)
            client = self.tokens.client_for(consent.provider)
            grant = client.exchange_code(server.type, code, verifier)
        except (GrantRefused, ProviderUnavailable, TokenUnavailable) as exc:
            return (
                consent,
                server,
                ConsentOutcome(False, f"The provider refused the sign-in: {exc.reason}", server.id),
            )
        except SecretDecryptError:
            return (
                consent,
                server,
                ConsentOutcome(
                    False,
                    "The sign-in link was made under a key this installation no longer has.",
                    server.id,
                ),
            )
        account = grant.signed_in_as
        if account is not None and account.casefold() != server.username.casefold():
            # The most common consent mistake: signed in with another account (the admin's
            # own) than the mailbox's. Its tokens would open the wrong mailbox.
            return (
                consent,
                server,
                ConsentOutcome(
                    False,
                    f"You signed in at {consent.provider} as {account}, but this mail server's "
                    f"user is {server.username}. Sign in as {server.username} (or change the "
                    "server's user); nothing was stored.",
                    server.id,
                ),
            )
        self.tokens.store_consent(server.id, consent.provider, grant)
        note = None
        if grant.refresh_token is None:
            note = (
                f"{consent.provider} gave no refresh token: the connection works until the "
                "access token expires, then needs consent again. Ask the provider's admin to "
                "allow offline access (scope offline_access) for this app."
            )
        return consent, server, ConsentOutcome(True, "Access granted.", server.id, note=note)

    def test_with_new_tokens(self, probe: Probe, server: EmailServer) -> ProbeResult:
        return probe(server, self.access_token_for_test(server))
