"""``/api/v1/email-servers``: the admin's list, create, edit, delete, duplicate and test."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Response, status

from services.config_api.dependencies import EmailServers, Manager, Reader
from services.config_api.email_server_service import EmailServerService, SavedServer
from services.config_api.errors import documented
from services.config_api.schemas import (
    AuthorizationLink,
    ConnectionResult,
    OAuthStatus,
    ServerCreate,
    ServerList,
    ServerOut,
    ServerPatch,
)
from services.config_api.server_rules import warnings_for
from shared.email_servers import EmailServer, ServerType
from shared.oauth.health import OAuthSummary

router = APIRouter(prefix="/email-servers", tags=["email servers"])
IF_MATCH_PATTERN = r'^[ \t]*(?:W/)?"?([0-9]+)"?[ \t]*$'
_VERSION_TAG = re.compile(IF_MATCH_PATTERN)


def _out(
    svc: EmailServerService,
    server: EmailServer | SavedServer,
    response: Response | None = None,
    summary: OAuthSummary | None = None,
) -> ServerOut:
    saved = server if isinstance(server, SavedServer) else SavedServer(server)
    server = saved.server
    if response is not None:
        response.headers["ETag"] = f'"{server.version}"'
    if summary is None:
        summary = svc.oauth_health.summaries([server]).get(server.id)
    warnings = [*warnings_for(server), *(summary.warnings if summary else ()), *saved.notes]
    oauth = OAuthStatus.model_validate(summary.public()) if summary else None
    return ServerOut.from_server(server, warnings, oauth, saved.authorization_url)


def _version_tag(schema: dict[str, Any]) -> None:
    """``If-Match`` is documented as the string it must be (not as "string or null")."""
    schema.pop("anyOf", None)
    schema.update(type="string", pattern=IF_MATCH_PATTERN)


def _parse_if_match(value: str | None) -> int | None:
    if value is None:
        return None
    match = _VERSION_TAG.match(value)
    if match is None:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST, detail='If-Match must hold a server version, e.g. "3"'
        )
    return int(match.group(1))


@router.get("", response_model=ServerList, responses=documented(422))
def list_servers(
    principal: Reader, svc: EmailServers, type: ServerType | None = None
) -> ServerList:
    servers = svc.list_servers(principal, type)
    summaries = svc.oauth_health.summaries(servers)
    return ServerList(items=[_out(svc, s, summary=summaries.get(s.id)) for s in servers])


@router.post(
    "",
    response_model=ServerOut,
    status_code=status.HTTP_201_CREATED,
    responses=documented(400, 422, 429),
)
def create_server(
    body: ServerCreate, principal: Manager, svc: EmailServers, response: Response
) -> ServerOut:
    saved = svc.create(principal, body)
    response.headers["Location"] = f"/api/v1/email-servers/{saved.server.id}"
    return _out(svc, saved, response)


@router.post("/test", response_model=ConnectionResult, responses=documented(400, 422, 429))
def test_connection(body: ServerCreate, principal: Manager, svc: EmailServers) -> ConnectionResult:
    """Test an unsaved server's settings; nothing is stored."""
    return ConnectionResult.model_validate(svc.test(principal, body).as_json())


@router.get("/{server_id}", response_model=ServerOut, responses=documented(404))
def get_server(
    server_id: str, principal: Reader, svc: EmailServers, response: Response
) -> ServerOut:
    return _out(svc, svc.get(principal, server_id), response)


@router.patch(
    "/{server_id}", response_model=ServerOut, responses=documented(400, 404, 409, 412, 422, 429)
)
def patch_server(
    server_id: str,
    body: ServerPatch,
    principal: Manager,
    svc: EmailServers,
    response: Response,
    if_match: Annotated[
        str | None,
        Header(
            description='The version the change is based on, e.g. `"3"`; a stale one answers '
            "412, a malformed one 400.",
            json_schema_extra=_version_tag,
        ),
    ] = None,
) -> ServerOut:
    """Change the fields sent. With ``If-Match: "<version>"`` a stale version answers 412."""
    saved = svc.patch(principal, server_id, body, _parse_if_match(if_match))
    return _out(svc, saved, response)


@router.delete("/{server_id}", status_code=status.HTTP_204_NO_CONTENT, responses=documented(404))
def delete_server(server_id: str, principal: Manager, svc: EmailServers) -> Response:
    svc.delete(principal, server_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{server_id}/duplicate",
    response_model=ServerOut,
    status_code=status.HTTP_201_CREATED,
    responses=documented(404),
)
def duplicate_server(
    server_id: str, principal: Manager, svc: EmailServers, response: Response
) -> ServerOut:
    """A disabled copy with the same settings and secrets, to change a few of them."""
    copy = svc.duplicate(principal, server_id)
    response.headers["Location"] = f"/api/v1/email-servers/{copy.id}"
    return _out(svc, copy, response)


@router.post(
    "/{server_id}/oauth/authorize", response_model=AuthorizationLink, responses=documented(404, 422)
)
def start_consent(server_id: str, principal: Manager, svc: EmailServers) -> AuthorizationLink:
    """A fresh authorization URL for an OAuth2 server: the admin opens it to give (again) the
    provider's consent; the callback stores the tokens and tests the connection."""
    return AuthorizationLink(authorization_url=svc.start_consent(principal, server_id))
