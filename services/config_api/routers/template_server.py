"""``/api/v1/template-server``: which SMTP server delivers the company's template mail."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from services.config_api.email_server_service import EmailServerService
from services.config_api.routers.email_servers import Manager, Reader, service
from services.config_api.schemas import TemplateServer

router = APIRouter(prefix="/template-server", tags=["template server"])
Service = Annotated[EmailServerService, Depends(service)]


@router.get("", response_model=TemplateServer)
def get_template_server(principal: Reader, svc: Service) -> TemplateServer:
    """``server_id: null`` means the system's default mail server delivers template mail."""
    return TemplateServer(server_id=svc.template_server_id(principal))


@router.put("", response_model=TemplateServer)
def put_template_server(body: TemplateServer, principal: Manager, svc: Service) -> TemplateServer:
    return TemplateServer(server_id=svc.set_template_server(principal, body.server_id))
