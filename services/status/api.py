"""``GET /api/v1/status/email-servers`` and its live stream (CONTRACT.md, status API).

Tenant-scoped like the config API: the token's tenant sees its own servers, nothing else; a
server of another tenant answers 404, as if it did not exist. ``email_servers:read`` suffices.

The stream (``/status/email-servers/stream``) is server-sent events: first one ``snapshot``
event (the list, as the GET answers it), then a ``state`` event per state change of one of the
tenant's servers (``{"tenant_id", "server_id", "state", "previous_state", "reason", "at"}``,
the alert's JSON) and a ``removed`` event when a server is deleted; a comment line every 15 s
keeps proxies from closing an idle stream. All streams of a process share one Redis
subscription (``live_stream.py``); a tenant may hold ``status_streams_per_tenant`` of them open
and the process ``status_streams``; beyond that the answer is 429 with ``Retry-After``, so one
tenant cannot take the streams (or the Redis connections) of another.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.encoders import jsonable_encoder
from pydantic import BaseModel, ConfigDict

from services.status.live_stream import STREAM_RESPONSES, LeasedStream, LiveStreams
from services.status.state import configure, now
from services.status.store import StatusStore
from shared.http_auth import AUTH_RESPONSES, Problem, require
from shared.oauth.health import OAuthHealth
from shared.server_directory import ServerDirectory
from shared.settings import Settings
from shared.tokens import READ, Principal

Reader = Annotated[Principal, Depends(require(READ))]
_RETRY_AFTER = {
    "description": "Seconds to wait before trying again.",
    "schema": {"type": "integer"},
}


class ServerState(BaseModel):
    """One server's status; fields beyond CONTRACT's may be added, never renamed."""

    model_config = ConfigDict(extra="allow")

    server_id: str
    name: str
    type: str
    enabled: bool
    state: str
    reason: str | None
    last_success_at: str | None
    last_error_at: str | None
    since: str
    last_error: str | None
    last_report_at: str | None
    consecutive_failures: int
    mails_fetched: int
    mails_sent: int
    mails_failed: int
    last_poll_seconds: float | None
    worker: str | None
    category: str | None


class ServerStates(BaseModel):
    items: list[ServerState]


def status_router(
    directory: ServerDirectory,
    store: StatusStore,
    settings: Settings,
    oauth_health: OAuthHealth | None = None,
) -> APIRouter:
    router = APIRouter(prefix="/api/v1/status", tags=["status"])
    live = LiveStreams.from_settings(settings)

    def items_for(tenant_id: str) -> list[dict[str, Any]]:
        servers = [s for s in directory.all() if s.tenant_id == tenant_id]
        stored = store.many(s.id for s in servers)
        # OAuth2 servers also show how their consent is doing, before it breaks.
        oauth = oauth_health.summaries(servers) if oauth_health else {}
        items = []
        for server in sorted(servers, key=lambda s: (s.name.casefold(), s.id)):
            current = stored.get(server.id)
            if current is None or current.version < server.version:
                current = configure(current, server, now())  # not folded in yet: as it will be
            item = current.public()
            item.update(name=server.name, type=server.type.value, enabled=server.enabled)
            summary = oauth.get(server.id)
            if summary is not None:
                item.update(
                    oauth=jsonable_encoder(summary.public()), oauth_warnings=summary.warnings
                )
            items.append(item)
        return items

    @router.get("/email-servers", response_model=ServerStates, responses=AUTH_RESPONSES)
    def list_states(principal: Reader) -> dict[str, Any]:
        return {"items": items_for(principal.tenant_id)}

    @router.get(
        "/email-servers/stream",
        response_class=LeasedStream,
        status_code=status.HTTP_200_OK,
        responses=STREAM_RESPONSES,
    )
    async def stream(principal: Reader, request: Request) -> LeasedStream:
        return await live.open(principal.tenant_id, request, items_for)

    @router.get(
        "/email-servers/{server_id}",
        response_model=ServerState,
        responses={
            **AUTH_RESPONSES,
            404: {"model": Problem, "description": "No such server of this tenant."},
        },
    )
    def one_state(server_id: str, principal: Reader) -> dict[str, Any]:
        for item in items_for(principal.tenant_id):
            if item["server_id"] == server_id:
                return item
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such server")

    return router
