"""SASL messages for logging in with an OAuth2 access token, shared by IMAP, POP3 and SMTP.

Two mechanisms exist: OAUTHBEARER (RFC 7628, the standard) and XOAUTH2 (Google's and
Microsoft's older one; Microsoft 365 offers only this). We use OAUTHBEARER where the server
offers it and XOAUTH2 otherwise, so that one code path serves every provider.

On a refused token both mechanisms answer with a challenge (a JSON error, base64) instead of
a final error; the client must send an empty response, then the server fails the command.
"""

from __future__ import annotations

from collections.abc import Iterable

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
