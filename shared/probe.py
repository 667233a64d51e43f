"""The connection test run on every enabled save and by ``POST /email-servers/test``.

Today it proves the parts that do not need the mail protocol: an inbound server has a routing
plan, the host name resolves and the port accepts a TCP connection. The protocol stage (TLS,
STARTTLS, login, folder, capabilities) is the status issue's work and plugs in here, so that
the config API and the workers keep calling this one function.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from shared.email_servers import EmailServer
from shared.hostnames import to_ascii


class ProbeCategory(StrEnum):
    OK = "ok"
    NO_ROUTING_PLAN = "no_routing_plan"
    DNS = "dns"
    REFUSED = "refused"
    TIMEOUT = "timeout"
    NETWORK = "network"


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reason: str | None
    category: ProbeCategory
    capabilities: list[str] = field(default_factory=list)
    checked_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["category"] = self.category.value
        data["checked_at"] = self.checked_at.isoformat()
        return data


Probe = Callable[[EmailServer, "str | None", float], ProbeResult]


def _fail(category: ProbeCategory, reason: str) -> ProbeResult:
    return ProbeResult(ok=False, reason=reason, category=category)


def probe_server(server: EmailServer, password: str | None, timeout: float) -> ProbeResult:
    """Test ``server`` with these settings; ``password`` is the plaintext, never stored here."""
    del password  # used by the protocol stage (login), which comes with the status issue
    if server.type.inbound and not server.routing_plan_id:
        return _fail(ProbeCategory.NO_ROUTING_PLAN, "no routing plan linked")
    port = server.effective_port
    try:
        host = to_ascii(server.host)
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, ValueError) as exc:
        return _fail(ProbeCategory.DNS, f"host name {server.host!r} could not be resolved: {exc}")
    last_error: OSError | None = None
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(timeout)
                sock.connect(address)
        except ConnectionRefusedError as exc:
            last_error = exc
            continue
        except TimeoutError:
            return _fail(
                ProbeCategory.TIMEOUT, f"connection to {host}:{port} timed out after {timeout:g} s"
            )
        except OSError as exc:
            last_error = exc
            continue
        return ProbeResult(ok=True, reason=None, category=ProbeCategory.OK)
    if isinstance(last_error, ConnectionRefusedError):
        return _fail(ProbeCategory.REFUSED, f"connection refused by {host}:{port}")
    return _fail(ProbeCategory.NETWORK, f"cannot reach {host}:{port}: {last_error}")
