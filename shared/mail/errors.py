"""Failures talking to a mail server, each with an admin-readable reason and a category.

Adapters raise :class:`MailServerError`; :func:`describe` turns any exception met on the way
(DNS, socket, TLS, protocol) into one, so every service reports failures the same way.
"""

from __future__ import annotations

import re
import socket
import ssl

from shared.contracts.status_reports import FailureCategory

# What a reason may quote of a foreign server's words: enough to recognise a message, too
# little to turn the connection test into a tool that reads other services' banners.
EXCERPT_CHARACTERS = 200
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e]")


def excerpt(words: bytes | str, limit: int = EXCERPT_CHARACTERS) -> str:
    """A server's words as one printable line of at most ``limit`` characters (cut with …).

    Control characters become U+FFFD (PostgreSQL's ``text`` refuses NUL, and a reply that
    could not be recorded would leave an accepted mail uncertain); whitespace runs become one
    space, so a reply of many lines reads as one.
    """
    text = words.decode("utf-8", "replace") if isinstance(words, bytes) else words
    text = " ".join(_UNPRINTABLE.sub("\ufffd", text[: limit * 4]).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class MailServerError(Exception):
    """Talking to a mail server failed; ``reason`` is fit for an admin's eyes."""

    def __init__(self, category: FailureCategory, reason: str) -> None:
        super().__init__(reason)
        self.category = category
        self.reason = reason


def describe(
    exc: BaseException, host: str, port: int, tls_name: str | None = None
) -> MailServerError:
    """The admin-readable form of ``exc``, met while talking to ``host:port``."""
    if isinstance(exc, MailServerError):
        return exc
    where = f"{host}:{port}"
    if isinstance(exc, socket.gaierror):
        return MailServerError(FailureCategory.DNS, f"host name {host!r} could not be resolved")
    if isinstance(exc, ConnectionRefusedError):
        return MailServerError(FailureCategory.REFUSED, f"connection refused by {where}")
    if isinstance(exc, TimeoutError | socket.timeout):
        return MailServerError(FailureCategory.TIMEOUT, f"no answer from {where} in time")
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or str(exc)
        if "mismatch" in detail.lower() or "not valid for" in detail.lower():
            detail = f"certificate is not valid for {tls_name or host}"
        return MailServerError(FailureCategory.CERTIFICATE, f"{detail} ({where})")
    if isinstance(exc, ssl.SSLError):
        return MailServerError(
            FailureCategory.TLS, f"TLS handshake with {where} failed: {exc.reason or exc}"
        )
    if isinstance(exc, ConnectionError | EOFError):
        return MailServerError(FailureCategory.NETWORK, f"{where} closed the connection")
    if isinstance(exc, OSError):
        return MailServerError(
            FailureCategory.NETWORK, f"cannot reach {where}: {exc.strerror or exc}"
        )
    return MailServerError(
        FailureCategory.PROTOCOL, f"unexpected answer from {where}: {excerpt(str(exc))}"
    )
