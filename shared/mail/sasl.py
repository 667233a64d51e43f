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


class Responder:
    """A SASL callback that gives up: the initial response to the first challenge, an error
    reply to the next (token mechanisms: the server then fails the command with its reason),
    then the client's cancel (``None``, sent as ``*``, RFC 4422 3.5). A server that challenges
    even after that gets :class:`~shared.mail.errors.MailServerError`: it cannot hold the
    connection for ever, nor have the credentials sent again and again."""

    def __init__(self, first: bytes, error_reply: bytes | None = None) -> None:
        self._answers: list[bytes | None] = [first]
        if error_reply is not None:
            self._answers.append(error_reply)
        self._answers.append(None)
        self._rounds = 0

    def __call__(self, challenge: bytes | None = None) -> bytes | None:
        self._rounds += 1
        if self._rounds > len(self._answers):
            raise MailServerError(
                FailureCategory.AUTHENTICATION,
                f"authentication failed: the server went on challenging after "
                f"{self._rounds - 1} rounds and the client's cancel",
            )
        return self._answers[self._rounds - 1]


class TokenResponder(Responder):
    """OAUTHBEARER or XOAUTH2 with an access token."""

    def __init__(self, mechanism: str, user: str, access_token: str) -> None:
        super().__init__(
            initial_response(mechanism, user, access_token).encode("utf-8"),
            error_reply(mechanism).encode("utf-8"),
        )


class PlainResponder(Responder):
    """PLAIN (RFC 4616): UTF-8 user name and password, answered once."""

    def __init__(self, user: str, password: str) -> None:
        super().__init__(f"\x00{user}\x00{password}".encode())
