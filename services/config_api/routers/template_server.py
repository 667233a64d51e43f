"""``/api/v1/template-server``: which SMTP server delivers the company's template mail."""

from __future__ import annotations

from fastapi import APIRouter

from services.config_api.dependencies import EmailServers, Manager, Reader
from services.config_api.errors import documented
from services.config_api.schemas import TemplateServer

router = APIRouter(prefix="/template-server", tags=["template server"])


@router.get("", response_model=TemplateServer, responses=documented())
def get_template_server(principal: Reader, svc: EmailServers) -> TemplateServer:
    """``server_id: null`` means the system's default mail server delivers template mail."""
    return TemplateServer(server_id=svc.template_server_id(principal))


@router.put("", response_model=TemplateServer, responses=documented(400, 404, 422))
def put_template_server(
    body: TemplateServer, principal: Manager, svc: EmailServers
) -> TemplateServer:
    return TemplateServer(server_id=svc.set_template_server(principal, body.server_id))
