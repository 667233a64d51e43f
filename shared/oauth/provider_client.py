"""Talking to a provider's token endpoint, and building its authorization URL (authlib).

Errors are split the way callers must act on them: :class:`GrantRefused` means the provider
said no to this grant (``invalid_grant``: consent revoked, refresh token expired or rotated
away) and only a new consent helps; :class:`ProviderUnavailable` is anything that may pass by
itself (network, 5xx, an answer that is not a token) or that the operator must fix
(``invalid_client``: the client secret expired).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpcore2
import httpx2
from authlib.integrations.base_client import OAuthError
from authlib.integrations.httpx_client import OAuth2Client

from shared.email_servers import ServerType
from shared.mail.errors import MailServerError
from shared.mail.network_policy import NetworkPolicy
from shared.oauth.providers import OAuthProvider
from shared.secrets import SecretBox, SecretDecryptError

# The provider's answer that means "this consent is over": the admin must give it again.
# (``invalid_client``, ``unauthorized_client`` and the like are the operator's to fix: the
# registered app, not the mailbox's consent.)
CONSENT_ENDED = frozenset({"invalid_grant"})


class GrantRefused(Exception):
    def __init__(self, provider: str, error: str, description: str | None) -> None:
        self.error = error
        self.reason = f"{provider} refused the grant: {error}" + (
            f" ({description})" if description else ""
        )
        super().__init__(self.reason)


class ProviderUnavailable(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class TokenGrant:
    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    expires_in: float
    signed_in_as: str | None = None  # from the id_token, when the provider sent one


def signed_in_as(id_token: object) -> str | None:
    """Who signed in at the provider, from the id_token's claims (email, preferred_username,
    upn: Google and Microsoft name the mailbox in one of them).

    The id_token came straight from the token endpoint over TLS, so its claims are read
    without checking the signature (OpenID Connect Core 3.1.3.7 allows this); a token that
    cannot be read names nobody.
    """
    if not isinstance(id_token, str) or id_token.count(".") != 2:
        return None
    payload = id_token.split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, TypeError):
        return None
    if not isinstance(claims, dict):
        return None
    for name in ("email", "preferred_username", "upn"):
        value = claims.get(name)
        if isinstance(value, str) and value:
            return value
    return None


class _PolicedBackend(httpcore2.SyncBackend):
    """httpcore's network backend, connecting only to an address the policy checked (the
    TLS handshake still names and verifies the endpoint's host)."""

    def __init__(self, policy: NetworkPolicy) -> None:
        self._policy = policy

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.NetworkStream:
        try:
            checked = self._policy.resolve(host, port)[0].address
        except MailServerError as exc:
            raise httpcore2.ConnectError(exc.reason) from None
        return super().connect_tcp(checked, port, timeout, local_address, socket_options)


def policed_transport(policy: NetworkPolicy) -> httpx2.HTTPTransport:
    """An httpx transport whose connections obey ``policy`` (the one every mail connection
    obeys too). httpx takes no network backend of its own, so its pool is replaced by one
    built with ours and httpx's default TLS context."""
    transport = httpx2.HTTPTransport(trust_env=False)
    transport._pool = httpcore2.ConnectionPool(
        ssl_context=httpx2.create_ssl_context(trust_env=False),
        network_backend=_PolicedBackend(policy),
    )
    return transport


class ProviderClient:
    """One provider, as seen by one Mailroom installation (its registered client)."""

    def __init__(
        self,
        provider: OAuthProvider,
        secret_box: SecretBox,
        redirect_uri: str,
        policy: NetworkPolicy,
        timeout: float = 15.0,
    ) -> None:
        self.provider = provider
        self._secret_box = secret_box
        self._redirect_uri = redirect_uri
        self._policy = policy
        self._timeout = timeout

    def check(self) -> None:
        """Raise :class:`ProviderUnavailable` now if the client secret cannot be opened: an
        admin must not sign in at the provider only to fail at the callback."""
        self._client_secret()

    def authorization_url(
        self, server_type: ServerType, *, state: str, code_verifier: str, login_hint: str
    ) -> str:
        params: dict[str, Any] = dict(self.provider.authorize_params)
        if login_hint:
            params["login_hint"] = login_hint  # the admin need not type the mailbox again
        with self._client(server_type) as client:
            url, _ = client.create_authorization_url(
                self.provider.authorize_url, state=state, code_verifier=code_verifier, **params
            )
        return str(url)

    def exchange_code(self, server_type: ServerType, code: str, code_verifier: str) -> TokenGrant:
        with self._client(server_type) as client:
            return self._grant(
                lambda: client.fetch_token(
                    self.provider.token_url,
                    grant_type="authorization_code",
                    code=code,
                    code_verifier=code_verifier,
                )
            )

    def refresh(self, server_type: ServerType, refresh_token: str) -> TokenGrant:
        with self._client(server_type) as client:
            return self._grant(
                lambda: client.refresh_token(self.provider.token_url, refresh_token=refresh_token)
            )

    def _client(self, server_type: ServerType) -> OAuth2Client:
        return OAuth2Client(
            client_id=self.provider.client_id,
            client_secret=self._client_secret(),
            token_endpoint_auth_method="client_secret_post",  # noqa: S106 - a method name
            scope=self.provider.scope(server_type),
            redirect_uri=self._redirect_uri,
            code_challenge_method="S256",
            timeout=self._timeout,
            trust_env=False,
            transport=policed_transport(self._policy),
        )

    def _client_secret(self) -> str:
        if not self.provider.client_secret_encrypted:
            return self.provider.client_secret
        try:
            return self._secret_box.decrypt(self.provider.client_secret_encrypted.encode())
        except SecretDecryptError:
            raise ProviderUnavailable(
                f"the client secret of provider {self.provider.name} cannot be decrypted with "
                "the configured keys: encrypt it again (mailroom encrypt-secret)"
            ) from None

    def _grant(self, call: Any) -> TokenGrant:
        name = self.provider.name
        try:
            token = call()
        except OAuthError as exc:
            error = str(exc.error)
            description = str(exc.description) if exc.description else None
            if error in CONSENT_ENDED:
                raise GrantRefused(name, error, description) from None
            detail = error + (f" ({description})" if description else "")
            raise ProviderUnavailable(f"{name} token endpoint refused: {detail}") from None
        except (httpx2.HTTPError, httpx2.InvalidURL, ValueError, KeyError, TypeError) as exc:
            # network, TLS, a bad address, an answer that is not a token
            raise ProviderUnavailable(
                f"{name} token endpoint unavailable: {type(exc).__name__}: {exc}"
            ) from None
        access = token.get("access_token")
        if not isinstance(access, str) or not access:
            raise ProviderUnavailable(f"{name} answered without an access token")
        refresh = token.get("refresh_token")
        expires_in = token.get("expires_in")
        try:
            lifetime = float(expires_in) if expires_in is not None else 3600.0
        except (TypeError, ValueError):
            lifetime = 3600.0
        return TokenGrant(
            access,
            refresh if isinstance(refresh, str) and refresh else None,
            lifetime,
            signed_in_as(token.get("id_token")),
        )
