"""The network policy: every spelling of a denied address is denied, and a connection goes to
the address that was checked."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from shared.mail.errors import MailServerError
from shared.mail.network_policy import DENIED_BY_DEFAULT, NetworkPolicy, parse_networks

PRODUCTION = NetworkPolicy.parse(DENIED_BY_DEFAULT)

# Each spelling reaches a network no tenant may reach in production.
DENIED_SPELLINGS = [
    "169.254.169.254",  # cloud metadata
    "169.254.169.254.",  # trailing dot
    "2852039166",  # decimal
    "0xa9fea9fe",  # hexadecimal
    "0251.0376.0251.0376",  # octal
    "::ffff:169.254.169.254",  # IPv4-mapped
    "::ffff:a9fe:a9fe",  # IPv4-mapped, hex
    "[::ffff:a9fe:a9fe]",  # bracketed
    "::a9fe:a9fe",  # IPv4-compatible
    "64:ff9b::a9fe:a9fe",  # NAT64
    "2002:a9fe:a9fe::1",  # 6to4
    "127.0.0.1",
    "127.1",  # short form
    "017700000001",  # octal loopback
    "localhost",
    "localhost.",
    "::1",
    "0.0.0.0",
    "0",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "100.64.0.1",  # CGNAT
    "fd00::1",  # ULA
    "fe80::1",  # link-local
    "224.0.0.1",  # multicast
    "ff02::1",
]


@pytest.mark.parametrize("host", DENIED_SPELLINGS)
def test_every_spelling_of_a_denied_address_is_denied(host: str) -> None:
    with pytest.raises(MailServerError) as refused:
        PRODUCTION.resolve(host, 993)
    assert "not allowed by this installation" in refused.value.reason


@pytest.mark.parametrize("host", ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"])
def test_public_addresses_are_allowed(host: str) -> None:
    assert [checked.address for checked in PRODUCTION.resolve(host, 993)] == [host]


def test_an_operator_allows_a_range_explicitly() -> None:
    on_premises = NetworkPolicy.parse(DENIED_BY_DEFAULT, "10.20.0.0/16")
    assert on_premises.resolve("10.20.1.5", 993)[0].address == "10.20.1.5"
    with pytest.raises(MailServerError):
        on_premises.resolve("10.21.1.5", 993)


def test_an_allowed_range_does_not_open_an_ipv4_address_inside_an_ipv6_one() -> None:
    """Allowing 2002::/16 (6to4) must not let 2002:a9fe:a9fe:: reach 169.254.169.254."""
    policy = NetworkPolicy.parse(DENIED_BY_DEFAULT, "2002::/16")
    assert policy.resolve("2002:5db8:d70e::1", 25)  # a public IPv4 inside: allowed
    with pytest.raises(MailServerError):
        policy.resolve("2002:a9fe:a9fe::1", 25)


class Rebinding:
    """A name server that answers an allowed address first and a denied one afterwards."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.asked = 0

    def __call__(self, host: str, port: int) -> list[tuple[Any, ...]]:
        address = self.answers[min(self.asked, len(self.answers) - 1)]
        self.asked += 1
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    server = socket.create_server(("127.0.0.1", 0))
    yield server
    server.close()


def test_a_connection_goes_to_the_address_that_was_checked(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    names = Rebinding("127.0.0.1", "169.254.169.254")
    policy = NetworkPolicy(PRODUCTION.denied, parse_networks("127.0.0.0/8"), resolver=names)
    with policy.connect("mail.example.org", port, timeout=2) as sock:
        assert sock.getpeername() == ("127.0.0.1", port)
    assert names.asked == 1  # resolved once: nothing between the check and the connect
    with pytest.raises(MailServerError) as refused:
        policy.connect("mail.example.org", port, timeout=2)
    assert refused.value.reason == (
        "connections to 169.254.169.254 are not allowed by this installation"
    )


def test_a_name_with_one_denied_address_is_refused_whole() -> None:
    def resolver(host: str, port: int) -> list[tuple[Any, ...]]:
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port)),
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::ffff:10.0.0.1", port, 0, 0)),
        ]

    with pytest.raises(MailServerError):
        NetworkPolicy(PRODUCTION.denied, resolver=resolver).resolve("mixed.example.org", 25)
