"""The JSON the config API accepts and returns (CONTRACT.md, HTTP API).

Field-level rules live here; rules that relate several fields (what belongs to which server
type) are in ``server_rules.py`` because a PATCH can only be judged on the merged server.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr

from services.config_api import field_rules
from shared.email_servers import AuthType, EmailServer, Role, ServerType

Name = Annotated[
    str,
    Field(max_length=200),
    AfterValidator(field_rules.single_line),
    AfterValidator(field_rules.not_blank),
]
Description = Annotated[str, Field(max_length=250), AfterValidator(field_rules.no_nul)]
Host = Annotated[str, Field(max_length=70), AfterValidator(field_rules.host)]
Port = Annotated[int, Field(ge=1, le=65535)]
Username = Annotated[str, Field(max_length=255), AfterValidator(field_rules.single_line)]
Password = Annotated[SecretStr, Field(max_length=255)]
InboxFolder = Annotated[
    str,
    Field(max_length=255),
    AfterValidator(field_rules.single_line),
    AfterValidator(field_rules.not_blank),
]
SniHostname = Annotated[str, Field(max_length=255), AfterValidator(field_rules.sni_hostname)]
SenderAddresses = Annotated[
    list[Annotated[str, Field(max_length=255)]],
    Field(max_length=100),
    AfterValidator(field_rules.sender_addresses),
]
RoutingPlanId = Annotated[str, Field(min_length=1, max_length=100)]
ProviderName = Annotated[str, Field(min_length=1, max_length=100)]


class ServerFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name | None = None
    description: Description | None = None
    host: Host | None = None
    port: Port | None = None
    tls: bool | None = None
    auth_type: AuthType | None = None
    username: Username | None = None
    password: Password | None = None
    reauthenticate_on_save: bool | None = None
    inbox_folder: InboxFolder | None = None
    sni_hostname: SniHostname | None = None
    disable_compression: bool | None = None
    routing_plan_id: RoutingPlanId | None = None
    sender_addresses: SenderAddresses | None = None
    enabled: bool | None = None
    role: Role | None = None
    is_template_server: bool | None = None
    oauth_provider: ProviderName | None = None

    def given(self) -> dict[str, Any]:
        """The fields the caller sent (explicit nulls included), with secrets still wrapped."""
        return {name: getattr(self, name) for name in self.model_fields_set}


class ServerCreate(ServerFields):
    """``POST /email-servers`` and ``POST /email-servers/test``."""

    type: ServerType
    name: Name
    host: Host


class ServerPatch(ServerFields):
    """``PATCH /email-servers/{id}``: only the fields sent change; an omitted password stays."""

    type: ServerType | None = None


class ConnectionResult(BaseModel):
    ok: bool
    reason: str | None = None
    category: str | None = None
    capabilities: list[str] = []
    checked_at: datetime | None = None


class ServerOut(BaseModel):
    id: str
    type: ServerType
    name: str
    description: str | None
    host: str
    port: int | None
    effective_port: int
    tls: bool
    auth_type: AuthType
    username: str
    has_password: bool
    reauthenticate_on_save: bool
    inbox_folder: str | None
    sni_hostname: str | None
    disable_compression: bool | None
    routing_plan_id: str | None
    sender_addresses: list[str]
    enabled: bool
    role: Role | None
    is_template_server: bool
    oauth_provider: str | None
    version: int
    connection: ConnectionResult | None = None
    warnings: list[str] = []
    created_at: datetime | None
    updated_at: datetime | None

    @classmethod
    def from_server(cls, server: EmailServer, warnings: list[str] | None = None) -> ServerOut:
        return cls(
            id=server.id,
            type=server.type,
            name=server.name,
            description=server.description,
            host=server.host,
            port=server.port,
            effective_port=server.effective_port,
            tls=server.tls,
            auth_type=server.auth_type,
            username=server.username,
            has_password=server.has_password,
            reauthenticate_on_save=server.reauthenticate_on_save,
            inbox_folder=server.inbox_folder,
            sni_hostname=server.sni_hostname,
            disable_compression=server.disable_compression,
            routing_plan_id=server.routing_plan_id,
            sender_addresses=list(server.sender_addresses),
            enabled=server.enabled,
            role=server.role,
            is_template_server=server.is_template_server,
            oauth_provider=server.oauth_provider,
            version=server.version,
            connection=(
                ConnectionResult.model_validate(server.last_connection)
                if server.last_connection
                else None
            ),
            warnings=warnings or [],
            created_at=server.created_at,
            updated_at=server.updated_at,
        )


class ServerList(BaseModel):
    items: list[ServerOut]


class TemplateServer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    server_id: str | None


class RoutingPlanCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name


class RoutingPlanOut(BaseModel):
    id: str
    name: str


class RoutingPlanList(BaseModel):
    items: list[RoutingPlanOut]
