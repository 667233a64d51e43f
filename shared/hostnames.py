"""Host names as admins type them (internationalised) and as sockets need them (ASCII)."""

from __future__ import annotations

import ipaddress

import idna


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def to_ascii(host: str) -> str:
    """The form to resolve and to send as SNI: A-labels (UTS 46) for names, IPs unbracketed."""
    if is_ip_literal(host):
        return host.strip("[]")
    name = host[:-1] if host.endswith(".") else host
    try:
        encoded = idna.encode(name, uts46=True, std3_rules=True).decode("ascii")
    except idna.IDNAError as exc:
        raise ValueError(f"is not a valid host name ({exc})") from exc
    if len(encoded) > 253:
        raise ValueError("is longer than a host name may be (253 characters in ASCII form)")
    return encoded
