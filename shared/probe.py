"""The connection test run on every enabled save and by ``POST /email-servers/test``.

Today it proves what needs no mail protocol: an inbound server has a routing plan, the host
name resolves to an allowed address and the port accepts a TCP connection. The protocol stage
(TLS, STARTTLS, login, folder, capabilities) plugs in here with the status issue, so that the
config API and the workers keep calling this one function.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from shared.contracts.status_reports import FailureCategory
from shared.email_servers import EmailServer
from shared.mail.errors import MailServerError, describe
from shared.mail.network_policy import NetworkPolicy
from shared.settings import Settings

NOT_YET_TESTED = "the server answers; login and folder are not tested yet"


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reason: str | None
    category: FailureCategory | None = None
    capabilities: list[str] = field(default_factory=list)
    note: str | None = None
    checked_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @classmethod
    def failed(cls, error: MailServerError) -> ProbeResult:
        return cls(ok=False, reason=error.reason, category=error.category)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["category"] = self.category.value if self.category else None
        data["checked_at"] = self.checked_at.isoformat()
        return data


# (server as it would be saved, its plaintext password) -> result
Probe = Callable[[EmailServer, "str | None"], ProbeResult]


@dataclass(frozen=True)
class ConnectionProbe:
    timeout: float
    policy: NetworkPolicy

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionProbe:
        return cls(settings.probe_timeout_seconds, NetworkPolicy.parse(settings.denied_networks))

    def __call__(self, server: EmailServer, password: str | None) -> ProbeResult:
        """Test ``server`` with these settings; ``password`` is the plaintext, never kept."""
        del password  # used by the protocol stage (login), which comes with the status issue
        if server.type.inbound and not server.routing_plan_id:
            return ProbeResult(False, "no routing plan linked", FailureCategory.NO_ROUTING_PLAN)
        try:
            self._connect(server)
        except MailServerError as error:
            return ProbeResult.failed(error)
        return ProbeResult(ok=True, reason=None, note=NOT_YET_TESTED)

    def _connect(self, server: EmailServer) -> None:
        port = server.effective_port
        last_error: OSError | None = None
        for family, kind, proto, _, address in self.policy.resolve(server.host, port):
            try:
                with socket.socket(family, kind, proto) as sock:
                    sock.settimeout(self.timeout)
                    sock.connect(address)
                return
            except OSError as exc:
                last_error = exc
        assert last_error is not None
        raise describe(last_error, server.host, port)
