"""SASL for logging in with an OAuth2 access token, shared by IMAP, POP3 and SMTP.

Two mechanisms exist: OAUTHBEARER (RFC 7628, the standard) and XOAUTH2 (Google's and
Microsoft's older one; Microsoft 365 offers only this). We use OAUTHBEARER where the server
offers it and XOAUTH2 otherwise, so that one code path serves every provider.

On a refused token both mechanisms answer with a challenge (a JSON error, base64) instead of
a final error; the client must answer it, then the server fails the command. RFC 7628 wants a
single ``\\x01`` from an OAUTHBEARER client; XOAUTH2 clients send an empty response.
"""

from __future__ import annotations

from collections.abc import Iterable

from shared.contracts.status_reports import FailureCategory
from shared.mail.errors import MailServerError

OAUTHBEARER = "OAUTHBEARER"
XOAUTH2 = "XOAUTH2"


def choose_mechanism(offered: Iterable[str]) -> str:
    """OAUTHBEARER when offered, else XOAUTH2 (also when the server lists neither: some
    servers accept XOAUTH2 without announcing it)."""
    return OAUTHBEARER if OAUTHBEARER in {name.upper() for name in offered} else XOAUTH2


def initial_response(mechanism: str, user: str, access_token: str) -> str:
    """The client's first (and only) message for ``mechanism``, before base64."""
    if mechanism == OAUTHBEARER:
        authzid = user.replace("=", "=3D").replace(",", "=2C")  # RFC 5801 saslname
        return f"n,a={authzid},\x01auth=Bearer {access_token}\x01\x01"
    return f"user={user}\x01auth=Bearer {access_token}\x01\x01"


def error_reply(mechanism: str) -> str:
    """What the client answers to the server's error challenge."""
    return "\x01" if mechanism == OAUTHBEARER else ""


# Challenges answered before the exchange is cancelled: the initial response and the reply to
# the error challenge are all a token login needs; a server that keeps asking is looping.
MAX_ROUNDS = 3


class TokenResponder:
    """A SASL callback: the initial response to the first challenge, the error reply to the
    next; after :data:`MAX_ROUNDS` it answers ``None``, which the caller sends as the
    client's cancel (``*``, RFC 4422 3.5), and a server that challenges even after that gets
    :class:`~shared.mail.errors.MailServerError`: it cannot hold the connection for ever."""

    def __init__(self, mechanism: str, user: str, access_token: str) -> None:
        self._first = initial_response(mechanism, user, access_token).encode("utf-8")
        self._error = error_reply(mechanism).encode("utf-8")
        self._rounds = 0

    def __call__(self, challenge: bytes | None = None) -> bytes | None:
        self._rounds += 1
        if self._rounds > MAX_ROUNDS + 1:
            raise MailServerError(
                FailureCategory.AUTHENTICATION,
                f"authentication failed: the server asked for more than {MAX_ROUNDS} rounds",
            )
        if self._rounds > MAX_ROUNDS:
            return None
        return self._first if self._rounds == 1 else self._error
