"""What the config API's routes ask FastAPI for: the caller and the services."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from services.config_api.email_server_service import EmailServerService
from services.config_api.routing_plan_service import RoutingPlanService
from shared.http_auth import require
from shared.tokens import MANAGE, READ, Principal

Reader = Annotated[Principal, Depends(require(READ))]
Manager = Annotated[Principal, Depends(require(MANAGE))]


def _email_servers(request: Request) -> EmailServerService:
    svc: EmailServerService = request.app.state.email_servers
    return svc


def _routing_plans(request: Request) -> RoutingPlanService:
    svc: RoutingPlanService = request.app.state.routing_plans
    return svc


EmailServers = Annotated[EmailServerService, Depends(_email_servers)]
RoutingPlans = Annotated[RoutingPlanService, Depends(_routing_plans)]
