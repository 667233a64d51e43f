"""Which addresses Mailroom may connect to on a tenant admin's behalf, checked after resolution.

A tenant admin chooses the host and port of every mail server and reads why a connection
failed; without a limit the connection test, the fetcher and the sender would reach the
operator's own network (cloud metadata, databases, admin consoles). So every connection to a
mail server, and to an OAuth2 provider's token endpoint, goes through :meth:`connect`:

- the name is resolved once, and every address it yields is checked in its canonical form
  (an IPv4 address hidden in an IPv6 one, as IPv4-mapped, IPv4-compatible, 6to4, NAT64 or
  Teredo, is checked as that IPv4 address too), so no spelling (``::ffff:a9fe:a9fe``,
  ``2852039166``, ``169.254.169.254.``) slips past;
- the connection goes to the address that was checked, never to a second resolution of the
  name (DNS rebinding).

An address is allowed when it, and every IPv4 address it carries, lies in an explicitly allowed
network or in no denied one. The
default denies what no public mail server uses: loopback, link-local, the private ranges
(RFC 1918, CGNAT, IPv6 ULA), 0.0.0.0/8, multicast and the reserved ranges. The operator allows
ranges explicitly (``MAILROOM_ALLOWED_NETWORKS``), e.g. an on-premises Exchange server's.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.contracts.status_reports import FailureCategory
from shared.hostnames import to_ascii
from shared.mail.errors import MailServerError

if TYPE_CHECKING:
    from shared.settings import Settings

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# What no mail server on the internet uses; the settings' default for MAILROOM_DENIED_NETWORKS.
DENIED_BY_DEFAULT = (
    "0.0.0.0/8,10.0.0.0/8,100.64.0.0/10,127.0.0.0/8,169.254.0.0/16,172.16.0.0/12,"
    "192.0.0.0/24,192.168.0.0/16,198.18.0.0/15,224.0.0.0/4,240.0.0.0/4,"
    "::/128,::1/128,fc00::/7,fe80::/10,ff00::/8"
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def parse_networks(text: str) -> tuple[IpNetwork, ...]:
    """``"10.0.0.0/8, ::1"`` → networks; a bare address is a network of one."""
    return tuple(ipaddress.ip_network(part.strip()) for part in text.split(",") if part.strip())


def spellings(address: IpAddress) -> list[IpAddress]:
    """The address itself and every IPv4 address it carries inside (checked as well)."""
    found: list[IpAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            found.append(address.ipv4_mapped)
        if address.sixtofour is not None:
            found.append(address.sixtofour)
        if address.teredo is not None:
            found.extend(address.teredo)
        if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
            found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


@dataclass(frozen=True)
class Resolved:
    """One address a name resolved to, checked: connect to ``sockaddr`` and nothing else."""

    family: socket.AddressFamily
    sockaddr: tuple[Any, ...]

    @property
    def address(self) -> str:
        return str(self.sockaddr[0])


# host, port -> getaddrinfo's answer; the tests put a resolver of their own here.
Resolver = Callable[[str, int], list[tuple[Any, ...]]]


def system_resolver(host: str, port: int) -> list[tuple[Any, ...]]:
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


@dataclass(frozen=True)
class NetworkPolicy:
    denied: tuple[IpNetwork, ...] = ()
    allowed: tuple[IpNetwork, ...] = ()
    resolver: Resolver = system_resolver

    @classmethod
    def parse(cls, denied: str, allowed: str = "") -> NetworkPolicy:
        return cls(parse_networks(denied), parse_networks(allowed))

    @classmethod
    def from_settings(cls, settings: Settings) -> NetworkPolicy:
        return cls.parse(settings.denied_networks, settings.allowed_networks)

    def permits(self, address: IpAddress) -> bool:
        """Every form of the address must pass: allowing an IPv6 range never opens the IPv4
        addresses carried inside it."""
        return all(self._permits_form(form) for form in spellings(address))

    def _permits_form(self, address: IpAddress) -> bool:
        if any(address in network for network in self.allowed):
            return True
        return not any(address in network for network in self.denied)

    def resolve(self, host: str, port: int) -> list[Resolved]:
        """Every address of ``host``, each checked; refuses the name if any is denied (a name
        that leads into a denied network is refused whole, so no retry reaches it)."""
        try:
            infos = self.resolver(to_ascii(host), port)
        except (OSError, UnicodeError, ValueError) as exc:
            raise MailServerError(
                FailureCategory.DNS, f"host name {host!r} could not be resolved"
            ) from exc
        resolved = []
        for family, _type, _proto, _name, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if not self.permits(address):
                raise MailServerError(
                    FailureCategory.NETWORK,
                    f"connections to {address} are not allowed by this installation",
                )
            resolved.append(Resolved(family, tuple(sockaddr)))
        if not resolved:
            raise MailServerError(FailureCategory.DNS, f"host name {host!r} has no IP address")
        return resolved

    def connect(
        self,
        host: str,
        port: int,
        timeout: float,
        make_socket: Callable[[socket.AddressFamily], socket.socket] | None = None,
    ) -> socket.socket:
        """A TCP connection to ``host``'s first checked address that answers.

        ``make_socket`` builds the unconnected socket (the mail adapters' guarded socket);
        the last connection error is raised when no address answers.
        """
        create = make_socket or (lambda family: socket.socket(family, socket.SOCK_STREAM))
        error: OSError | None = None
        for target in self.resolve(host, port):
            sock = create(target.family)
            try:
                sock.settimeout(timeout)
                sock.connect(target.sockaddr)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            return sock
        assert error is not None  # resolve() returned at least one address
        raise error
