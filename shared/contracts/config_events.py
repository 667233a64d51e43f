"""Config events: the config API tells the workers that a server or routing plan changed.

The JSON shape is part of the contract (CONTRACT.md, AMQP). Events never carry a setting or a
secret: a worker re-reads the server from the database.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.email_servers import ServerType
from shared.topology import ROUTING_PLAN_CREATED

EmailServerChange = Literal["created", "updated", "deleted"]


def _now() -> datetime:
    return datetime.now(UTC)


def _new_id() -> str:
    return str(uuid.uuid4())


class ConfigEvent(BaseModel):
    """A mail server was created, changed or deleted (exchange ``mailroom.config``)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: int = 1
    event_id: str = Field(default_factory=_new_id)
    occurred_at: datetime = Field(default_factory=_now)
    change: EmailServerChange
    tenant_id: str
    server_id: str
    server_type: ServerType
    version: int
    enabled: bool
    changed_fields: tuple[str, ...] = ()

    @property
    def routing_key(self) -> str:
        return f"email_server.{self.change}"


class RoutingPlanEvent(BaseModel):
    """A routing plan was created; its inbound queue must exist (``routing_plan.created``)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: int = 1
    event_id: str = Field(default_factory=_new_id)
    occurred_at: datetime = Field(default_factory=_now)
    tenant_id: str
    routing_plan_id: str

    @property
    def routing_key(self) -> str:
        return ROUTING_PLAN_CREATED
