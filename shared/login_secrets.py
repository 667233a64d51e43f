"""The secret a worker logs in to a mail server with, whatever the server's authentication.

Basic servers: the stored password, decrypted. OAuth2 servers: a valid access token
(``shared.oauth.tokens``, refreshed when due). Failures come back as ``MailServerError`` with
a category the status service understands: ``reauth_required`` when only the admin's consent
helps, ``authentication`` for a password no key opens, ``network`` when the provider's token
endpoint cannot be reached.
"""

from __future__ import annotations

import logging

from shared.contracts.status_reports import FailureCategory
from shared.email_servers import AuthType, EmailServer
from shared.mail.errors import MailServerError
from shared.oauth.tokens import OAuthTokens, ReauthRequired, TokenUnavailable
from shared.secrets import SecretBox, SecretDecryptError

log = logging.getLogger(__name__)

UNDECRYPTABLE_REASON = (
    "the stored password cannot be decrypted with the configured keys; enter it again"
)


def decrypt_password(secret_box: SecretBox, token: bytes) -> str:
    """A server's stored password; a key removed too early is the server's failure to report
    (``MailServerError``, authentication), not an error of whatever was going to use it."""
    try:
        return secret_box.decrypt(token)
    except SecretDecryptError as exc:
        raise MailServerError(FailureCategory.AUTHENTICATION, UNDECRYPTABLE_REASON) from exc


class LoginSecrets:
    def __init__(self, secret_box: SecretBox, tokens: OAuthTokens) -> None:
        self._secret_box = secret_box
        self.tokens = tokens

    def for_server(self, server: EmailServer) -> str | None:
        if server.auth_type is AuthType.OAUTH2:
            try:
                return self.tokens.access_token(server)
            except ReauthRequired as exc:
                raise MailServerError(FailureCategory.REAUTH_REQUIRED, exc.reason) from None
            except TokenUnavailable as exc:
                raise MailServerError(FailureCategory.NETWORK, exc.reason) from None
        token = server.password_encrypted
        if token is None:
            return None
        return decrypt_password(self._secret_box, token)

    def login_refused(self, server: EmailServer) -> None:
        """The mail server refused the login. For OAuth2 the token may have been revoked
        before its time: refresh before the next login, which either brings a token that
        works or the provider's refusal (then ``reauth_required``)."""
        if server.auth_type is not AuthType.OAUTH2:
            return
        try:
            self.tokens.rejected(server)
        except Exception:  # noqa: BLE001 - a hint for the next login; never the caller's failure
            log.warning("could not mark the token of server %s for refresh", server.id)
