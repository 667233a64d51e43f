"""How every Mailroom process reaches a mail server: one object for the probe, the fetcher and
the sender, so that all of them apply the same network policy, timeouts, read limits and TLS
trust.

:meth:`Connector.connect` resolves the server's host once, checks every address
(``shared.mail.network_policy``), connects to a checked one and returns a socket whose reads
are bounded per answer (``shared.mail.guarded_socket``). :meth:`Connector.tls` is the TLS
context for that server (verified against the SNI name, else the host).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from shared.email_servers import EmailServer
from shared.mail.guarded_socket import AnswerLimits, GuardedSocket, ReadGuard
from shared.mail.network_policy import NetworkPolicy
from shared.mail.tls import NamedContext, client_context, connect_address, tls_server_name
from shared.settings import Settings


@dataclass(frozen=True)
class Connector:
    policy: NetworkPolicy
    timeout: float = 30.0
    ca_bundle: Path | None = None
    limits: AnswerLimits = field(default_factory=AnswerLimits)

    @classmethod
    def from_settings(cls, settings: Settings, timeout: float) -> Connector:
        return cls(
            policy=NetworkPolicy.from_settings(settings),
            timeout=timeout,
            ca_bundle=settings.ca_bundle,
            limits=AnswerLimits(max_bytes=settings.mail_answer_max_bytes, max_seconds=timeout),
        )

    def connect(self, server: EmailServer) -> GuardedSocket:
        """A TCP connection to a checked address of ``server`` (no TLS yet). The operator's own
        servers (the system default SMTP relay, often on loopback) are the operator's choice,
        not a tenant's: the policy does not apply to them; the read limits do."""
        host, port = connect_address(server)
        policy = _OPERATORS_CHOICE if server.operators_own else self.policy
        sock = policy.connect(host, port, self.timeout, make_socket=_guarded_socket)
        assert isinstance(sock, GuardedSocket)
        sock.guard = ReadGuard(self.limits)
        # Every write leaves at once: a mail's final "." written on its own would otherwise
        # wait (Nagle) for the server to acknowledge the mail, up to 40 ms on Linux.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def tls(self, server: EmailServer) -> NamedContext:
        return NamedContext(client_context(self.ca_bundle), tls_server_name(server), self.limits)


_OPERATORS_CHOICE = NetworkPolicy()


def _guarded_socket(family: socket.AddressFamily) -> socket.socket:
    return GuardedSocket(family, socket.SOCK_STREAM)
