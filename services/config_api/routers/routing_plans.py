"""``/api/v1/routing-plans``: the contact center's email routing plans, one queue each."""

from __future__ import annotations

from fastapi import APIRouter, status

from services.config_api.dependencies import Manager, Reader, RoutingPlans
from services.config_api.errors import documented
from services.config_api.schemas import RoutingPlanCreate, RoutingPlanList, RoutingPlanOut

router = APIRouter(prefix="/routing-plans", tags=["routing plans"])


@router.get("", response_model=RoutingPlanList, responses=documented())
def list_routing_plans(principal: Reader, svc: RoutingPlans) -> RoutingPlanList:
    plans = svc.list_plans(principal)
    return RoutingPlanList(items=[RoutingPlanOut(id=p.id, name=p.name) for p in plans])


@router.post(
    "",
    response_model=RoutingPlanOut,
    status_code=status.HTTP_201_CREATED,
    responses=documented(400, 422),
)
def create_routing_plan(
    body: RoutingPlanCreate, principal: Manager, svc: RoutingPlans
) -> RoutingPlanOut:
    """Creates the plan; its queue ``mailroom.inbound.<id>`` is declared right after."""
    plan = svc.create(principal, body.name)
    return RoutingPlanOut(id=plan.id, name=plan.name)
