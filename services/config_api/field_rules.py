"""Single-field rules of REQUIREMENTS.md: lengths in characters, host names, addresses.

Pure functions that raise ``ValueError`` with a message an admin can read; pydantic turns them
into 422 answers that name the field.
"""

from __future__ import annotations

import unicodedata

from email_validator import EmailNotValidError, validate_email

from shared.hostnames import is_ip_literal, to_ascii

# Line breaks and NUL in a value that ends up in an IMAP/POP3/SMTP command or a mail header
# would let an admin (or whoever holds their token) inject protocol commands.
_FORBIDDEN_IN_LINE = {"\r", "\n", "\x00"}


def no_line_breaks(value: str) -> bool:
    return not any(ch in _FORBIDDEN_IN_LINE for ch in value)


def single_line(value: str) -> str:
    if any(unicodedata.category(ch) == "Cc" for ch in value):
        raise ValueError("must not contain line breaks or control characters")
    return value


def no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def host(value: str) -> str:
    """A host name (internationalised names allowed) or an IP address."""
    value = single_line(value).strip()
    if not value:
        raise ValueError("must not be empty")
    if is_ip_literal(value):
        return value
    try:
        to_ascii(value)
    except ValueError as exc:
        raise ValueError(f"must be a host name or an IP address: {exc}") from exc
    return value


def sni_hostname(value: str) -> str:
    """The name the server's certificate is checked against.

    Only length and "one line" are rules of the source document; whether the name matches the
    certificate is what the connection test tells. RFC 6066 forbids IP literals in SNI.
    """
    value = not_blank(single_line(value)).strip()
    if is_ip_literal(value):
        raise ValueError("must be a host name; TLS server name indication cannot carry an IP")
    return value


def sender_addresses(values: list[str]) -> list[str]:
    """Valid mailbox addresses, de-duplicated case-insensitively, first spelling kept."""
    seen: set[str] = set()
    result: list[str] = []
    for index, raw in enumerate(values):
        address = raw.strip()
        try:
            validate_email(address, check_deliverability=False, allow_smtputf8=True)
        except EmailNotValidError as exc:
            raise ValueError(f"entry {index} ({address!r}) is not a valid address: {exc}") from exc
        key = address.casefold()
        if key not in seen:
            seen.add(key)
            result.append(address)
    return result


def looks_like_email_address(value: str) -> bool:
    try:
        validate_email(value, check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError:
        return False
    return True
