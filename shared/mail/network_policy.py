"""Which addresses Mailroom may connect to on an admin's behalf.

A tenant admin chooses the host and port of every mail server and sees why a connection
failed; without a limit the connection test is a scanner of the operator's network. Link-local
addresses (cloud metadata services) are refused by default; operators add their internal
ranges (and loopback in production) to ``MAILROOM_DENIED_NETWORKS``.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

from shared.contracts.status_reports import FailureCategory
from shared.hostnames import to_ascii
from shared.mail.errors import MailServerError

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
AddressInfo = tuple[Any, ...]


@dataclass(frozen=True)
class NetworkPolicy:
    denied: tuple[IpNetwork, ...] = ()

    @classmethod
    def parse(cls, text: str) -> NetworkPolicy:
        return cls(tuple(ipaddress.ip_network(n.strip()) for n in text.split(",") if n.strip()))

    def resolve(self, host: str, port: int) -> list[AddressInfo]:
        """Addresses of ``host`` to connect to; refuses names that lead into a denied network."""
        try:
            infos = socket.getaddrinfo(to_ascii(host), port, type=socket.SOCK_STREAM)
        except (socket.gaierror, ValueError) as exc:
            raise MailServerError(
                FailureCategory.DNS, f"host name {host!r} could not be resolved"
            ) from exc
        for info in infos:
            address = ipaddress.ip_address(info[4][0])
            if any(address in network for network in self.denied):
                raise MailServerError(
                    FailureCategory.NETWORK,
                    f"connections to {address} are not allowed by this installation",
                )
        return infos
