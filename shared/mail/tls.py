"""TLS for every mail connection: verified certificates, the right name, modern versions.

Certificates are checked against the system store plus the operator's ``MAILROOM_CA_BUNDLE``,
and against the SNI server name when the admin set one, else the host (REQUIREMENTS: SNI).
The TLS socket keeps bounding what the server may send (``shared.mail.guarded_socket``).
"""

from __future__ import annotations

import socket
import ssl
from functools import lru_cache
from pathlib import Path
from typing import Any

from shared.email_servers import EmailServer
from shared.hostnames import to_ascii
from shared.mail.guarded_socket import AnswerLimits, GuardedSSLSocket, ReadGuard


@lru_cache(maxsize=8)
def client_context(ca_bundle: Path | None = None) -> ssl.SSLContext:
    """A context shared by all connections (loading the system store costs milliseconds)."""
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.sslsocket_class = GuardedSSLSocket
    if ca_bundle is not None:
        context.load_verify_locations(cafile=str(ca_bundle))
    return context


def tls_server_name(server: EmailServer) -> str:
    """The name sent as SNI and checked against the certificate (an IP is checked, not sent)."""
    return to_ascii(server.sni_hostname or server.host)


def connect_address(server: EmailServer) -> tuple[str, int]:
    """Where to open the TCP connection: the host (ASCII form) and the effective port."""
    return to_ascii(server.host), server.effective_port


class NamedContext:
    """An SSLContext that checks the certificate against the SNI name, not the host, and
    hands the plain socket's read guard on to the TLS socket.

    imaplib and smtplib pass the host they connect to as ``server_hostname``; Mailroom connects
    to the address it checked, and an admin may name the certificate's host in the SNI field.
    """

    def __init__(self, context: ssl.SSLContext, server_name: str, limits: AnswerLimits) -> None:
        self._context = context
        self._server_name = server_name
        self._limits = limits

    def wrap_socket(self, sock: socket.socket, **kwargs: Any) -> ssl.SSLSocket:
        kwargs["server_hostname"] = self._server_name
        guard = getattr(sock, "guard", None)
        secure = self._context.wrap_socket(sock, **kwargs)
        secure.guard = guard if isinstance(guard, ReadGuard) else ReadGuard(self._limits)  # type: ignore[attr-defined]
        return secure
