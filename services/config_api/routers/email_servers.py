"""``/api/v1/email-servers``: the admin's list, create, edit, delete, duplicate and test."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Response, status

from services.config_api.dependencies import EmailServers, Manager, Reader
from services.config_api.schemas import (
    ConnectionResult,
    ServerCreate,
    ServerList,
    ServerOut,
    ServerPatch,
)
from services.config_api.server_rules import warnings_for
from shared.email_servers import EmailServer, ServerType

router = APIRouter(prefix="/email-servers", tags=["email servers"])
_VERSION_TAG = re.compile(r'^\s*(?:W/)?"?(\d+)"?\s*$')


def _out(server: EmailServer, response: Response | None = None) -> ServerOut:
    if response is not None:
        response.headers["ETag"] = f'"{server.version}"'
    return ServerOut.from_server(server, warnings_for(server))


def _parse_if_match(value: str | None) -> int | None:
    if value is None:
        return None
    match = _VERSION_TAG.match(value)
    if match is None:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST, detail='If-Match must hold a server version, e.g. "3"'
        )
    return int(match.group(1))


@router.get("", response_model=ServerList)
def list_servers(
    principal: Reader, svc: EmailServers, type: ServerType | None = None
) -> ServerList:
    return ServerList(items=[_out(s) for s in svc.list_servers(principal, type)])


@router.post("", response_model=ServerOut, status_code=status.HTTP_201_CREATED)
def create_server(
    body: ServerCreate, principal: Manager, svc: EmailServers, response: Response
) -> ServerOut:
    server = svc.create(principal, body)
    response.headers["Location"] = f"/api/v1/email-servers/{server.id}"
    return _out(server, response)


@router.post("/test", response_model=ConnectionResult)
def test_connection(body: ServerCreate, principal: Manager, svc: EmailServers) -> ConnectionResult:
    """Test an unsaved server's settings; nothing is stored."""
    return ConnectionResult.model_validate(svc.test(principal, body).as_json())


@router.get("/{server_id}", response_model=ServerOut)
def get_server(
    server_id: str, principal: Reader, svc: EmailServers, response: Response
) -> ServerOut:
    return _out(svc.get(principal, server_id), response)


@router.patch("/{server_id}", response_model=ServerOut)
def patch_server(
    server_id: str,
    body: ServerPatch,
    principal: Manager,
    svc: EmailServers,
    response: Response,
    if_match: Annotated[str | None, Header()] = None,
) -> ServerOut:
    """Change the fields sent. With ``If-Match: "<version>"`` a stale version answers 412."""
    return _out(svc.patch(principal, server_id, body, _parse_if_match(if_match)), response)


@router.delete("/{server_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_server(server_id: str, principal: Manager, svc: EmailServers) -> Response:
    svc.delete(principal, server_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{server_id}/duplicate", response_model=ServerOut, status_code=status.HTTP_201_CREATED
)
def duplicate_server(
    server_id: str, principal: Manager, svc: EmailServers, response: Response
) -> ServerOut:
    """A disabled copy with the same settings and secrets, to change a few of them."""
    copy = svc.duplicate(principal, server_id)
    response.headers["Location"] = f"/api/v1/email-servers/{copy.id}"
    return _out(copy, response)
