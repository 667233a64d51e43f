"""Status reports: what a worker saw when it last used a mail server (workers → status).

The fetcher reports after every poll or IDLE wake-up, the sender after every delivery attempt
and the connection probe after every test. The status service folds them into the current
state of each server (CONTRACT.md, status API). Reports never carry a secret: a reason quotes
the server's answer, never what was sent to it.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from shared.email_servers import ServerType


class FailureCategory(StrEnum):
    """Why talking to a mail server failed, for dashboards and alert routing."""

    DNS = "dns"
    REFUSED = "refused"
    TIMEOUT = "timeout"
    NETWORK = "network"
    TLS = "tls"
    CERTIFICATE = "certificate"
    AUTHENTICATION = "authentication"
    FOLDER_MISSING = "folder_missing"
    UNROUTABLE = "unroutable"
    NO_ROUTING_PLAN = "no_routing_plan"
    PROTOCOL = "protocol"
    REAUTH_REQUIRED = "reauth_required"
    INTERNAL = "internal"


class StatusReport(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: int = 1
    report_id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    tenant_id: str
    server_id: str
    server_type: ServerType
    server_version: int
    worker: str  # which process reported (service.host.pid)
    ok: bool
    connected: bool = False
    reason: str | None = None
    category: FailureCategory | None = None
    mails_fetched: int = 0
    mails_sent: int = 0
    mails_failed: int = 0
    duration_seconds: float | None = None
