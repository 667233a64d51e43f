"""``/api/v1/oauth/callback``: where the provider sends the admin's browser after consent.

It carries no bearer token (a browser redirect cannot); the single-use ``state`` names the
consent an authenticated admin started. The answer is a small page for the browser, or JSON
for a client that asks for it (``Accept: application/json``).
"""

from __future__ import annotations

import html

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel

from services.config_api.dependencies import EmailServers, Reader
from services.config_api.errors import documented
from services.config_api.schemas import ConnectionResult, ProviderList

router = APIRouter(prefix="/oauth", tags=["oauth2"])


@router.get("/providers", response_model=ProviderList, responses=documented())
def list_providers(principal: Reader, svc: EmailServers) -> ProviderList:
    """The providers an admin may pick for ``oauth_provider`` (names, never client secrets);
    ``configured: false`` means the operator has not registered a client there yet."""
    return ProviderList.from_providers(svc.consents.tokens.providers)


_PAGE = {"text/html": {"schema": {"type": "string"}}}


class ConsentAnswer(BaseModel):
    """The callback's answer to a client that asks for JSON."""

    ok: bool
    message: str
    server_id: str | None
    connection: ConnectionResult | None


@router.get(
    "/callback",
    response_model=None,
    responses={
        200: {
            "model": ConsentAnswer,
            "content": _PAGE,
            "description": "Access granted: a page for the browser, or JSON when asked for.",
        },
        400: {
            "model": ConsentAnswer,
            "content": _PAGE,
            "description": "No access: the link expired or was used, the provider refused, or "
            "the admin signed in as another account; the message says which.",
        },
    },
)
def consent_callback(
    request: Request,
    svc: EmailServers,
    state: str = "",
    code: str | None = None,
    error: str | None = None,
    error_description: str | None = None,
) -> Response:
    outcome = svc.finish_consent(state, code, error, error_description)
    status_code = 200 if outcome.ok else 400
    if "application/json" in request.headers.get("accept", ""):
        return JSONResponse(
            {
                "ok": outcome.ok,
                "message": outcome.message,
                "server_id": outcome.server_id,
                "connection": outcome.connection.as_json() if outcome.connection else None,
            },
            status_code=status_code,
        )
    title = "Mail server connected" if outcome.ok else "Mail server not connected"
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{title}</title></head><body><h1>{title}</h1>"
        f"<p>{html.escape(outcome.message)}</p><p>You can close this window.</p></body></html>"
    )
    return HTMLResponse(page, status_code=status_code, headers={"Cache-Control": "no-store"})
