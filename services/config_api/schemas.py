"""The JSON the config API accepts and returns (CONTRACT.md, HTTP API).

Field-level rules live here; rules that relate several fields (what belongs to which server
type) are in ``server_rules.py`` because a PATCH can only be judged on the merged server.
"""

from __future__ import annotations

import unicodedata
from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    StrictBool,
    StrictInt,
)

from services.config_api import field_rules
from shared.email_servers import AuthType, EmailServer, Role, ServerType
from shared.oauth.providers import OAuthProvider

NAME_MAX_LENGTH = 200


def _chars(limit: int) -> AfterValidator:
    """At most ``limit`` characters, counted as a person counts them.

    Lengths are in characters, not bytes (REQUIREMENTS). "é" typed as e + combining accent is
    two code points but one character, so the text is counted in its composed (NFC) form; the
    value itself is stored as sent, since a folder or user name must match the server's.
    """

    def check(value: str) -> str:
        if len(unicodedata.normalize("NFC", value)) > limit:
            raise ValueError(f"must be at most {limit} characters")
        return value

    return AfterValidator(check)


def _password_length(value: SecretStr) -> SecretStr:
    if len(unicodedata.normalize("NFC", value.get_secret_value())) > 255:
        raise ValueError("must be at most 255 characters")
    return value


def _documented(pattern: str, description: str) -> Any:
    """What a field's validators check, told in its JSON Schema as a pattern (the validators
    stay the rule: their messages name the problem in words)."""
    return Field(json_schema_extra={"pattern": pattern}, description=description)


# No control character (Unicode category Cc: line breaks, tabs, NUL...).
_ONE_LINE = r"^[^\u0000-\u001f\u007f-\u009f]*$"
_ONE_LINE_NOT_BLANK = (
    r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$"
)

Name = Annotated[
    str,
    _chars(NAME_MAX_LENGTH),
    AfterValidator(field_rules.single_line),
    AfterValidator(field_rules.not_blank),
    _documented(_ONE_LINE_NOT_BLANK, "One line, not blank, at most 200 characters (NFC)."),
]
Description = Annotated[
    str,
    _chars(250),
    AfterValidator(field_rules.no_nul),
    _documented(r"^[^\u0000]*$", "No NUL, at most 250 characters (NFC)."),
]
Host = Annotated[
    str,
    _chars(70),
    AfterValidator(field_rules.host),
    _documented(
        _ONE_LINE_NOT_BLANK,
        "A host name (internationalised names allowed, checked by IDNA) or an IP address; at "
        "most 70 characters.",
    ),
]


def _whole_number(value: Any) -> Any:
    """JSON Schema's ``integer`` includes ``993.0``; a string or a fraction stays refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Port = Annotated[StrictInt, Field(ge=1, le=65535), BeforeValidator(_whole_number)]
Username = Annotated[
    str,
    _chars(255),
    AfterValidator(field_rules.single_line),
    _documented(_ONE_LINE, "One line, at most 255 characters (NFC)."),
]
Password = Annotated[
    SecretStr,
    AfterValidator(_password_length),
    _documented(r"^[^\r\n\u0000]*$", "No line break or NUL, at most 255 characters (NFC)."),
]
InboxFolder = Annotated[
    str,
    _chars(255),
    AfterValidator(field_rules.single_line),
    AfterValidator(field_rules.not_blank),
    _documented(_ONE_LINE_NOT_BLANK, "One line, not blank, at most 255 characters (NFC)."),
]
SniHostname = Annotated[
    str,
    _chars(255),
    AfterValidator(field_rules.sni_hostname),
    _documented(_ONE_LINE_NOT_BLANK, "A host name, not an IP address; at most 255 characters."),
]
SenderAddresses = Annotated[
    list[Annotated[str, _chars(255)]],
    Field(max_length=100),
    AfterValidator(field_rules.sender_addresses),
]
RoutingPlanId = Annotated[
    str,
    Field(min_length=1, max_length=100),
    AfterValidator(field_rules.single_line),
    _documented(_ONE_LINE, "The id of one of the tenant's routing plans."),
]
ProviderName = Annotated[str, Field(min_length=1, max_length=100)]


class ServerFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name | None = None
    description: Description | None = None
    host: Host | None = None
    port: Port | None = None
    tls: StrictBool | None = None
    auth_type: AuthType | None = None
    username: Username | None = None
    password: Password | None = None
    reauthenticate_on_save: StrictBool | None = None
    inbox_folder: InboxFolder | None = None
    sni_hostname: SniHostname | None = None
    disable_compression: StrictBool | None = None
    routing_plan_id: RoutingPlanId | None = None
    sender_addresses: SenderAddresses | None = None
    enabled: StrictBool | None = None
    role: Role | None = None
    is_template_server: StrictBool | None = None
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
    note: str | None = None
    checked_at: datetime | None = None


class OAuthStatus(BaseModel):
    """An OAuth2 server's consent, as the admin sees it; never a token."""

    state: str = Field(description="consent_needed, ok or reauth_required")
    reason: str | None = None
    consented_at: datetime | None = None
    access_token_expires_at: datetime | None = None
    refresh_token_age_days: float | None = None
    refresh_token_expires_at: datetime | None = None
    client_secret_expires_at: datetime | None = None


class AuthorizationLink(BaseModel):
    authorization_url: str


class ProviderOut(BaseModel):
    name: str
    configured: bool
    scopes: dict[str, list[str]]


class ProviderList(BaseModel):
    items: list[ProviderOut]

    @classmethod
    def from_providers(cls, providers: dict[str, OAuthProvider]) -> ProviderList:
        return cls(
            items=[
                ProviderOut(
                    name=p.name,
                    configured=p.configured,
                    scopes={t.value: list(s) for t, s in p.scopes.items()},
                )
                for p in sorted(providers.values(), key=lambda p: p.name)
            ]
        )


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
    starttls_seen: bool = Field(
        default=False,
        description="A connection test saw this host and port offer STARTTLS: credentials go "
        "there only over TLS from now on, and a server that stops offering it fails with "
        "that reason instead of getting them in plain text.",
    )
    connection: ConnectionResult | None = None
    oauth: OAuthStatus | None = None
    authorization_url: str | None = Field(
        default=None,
        description="OAuth2: open this in the admin's browser to give the provider's consent "
        "(in the answer to a save that needs it).",
    )
    warnings: list[str] = []
    created_at: datetime | None
    updated_at: datetime | None

    @classmethod
    def from_server(
        cls,
        server: EmailServer,
        warnings: list[str] | None = None,
        oauth: OAuthStatus | None = None,
        authorization_url: str | None = None,
    ) -> ServerOut:
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
            starttls_seen=server.requires_tls and not server.tls,
            connection=(
                ConnectionResult.model_validate(server.last_connection)
                if server.last_connection
                else None
            ),
            oauth=oauth,
            authorization_url=authorization_url,
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
