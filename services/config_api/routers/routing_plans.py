"""``/api/v1/routing-plans``: the contact center's email routing plans, one queue each."""

from __future__ import annotations

from fastapi import APIRouter, status

from services.config_api.dependencies import Manager, Pool, Reader
from services.config_api.schemas import RoutingPlanCreate, RoutingPlanList, RoutingPlanOut
from shared.contracts import RoutingPlanEvent
from shared.db import audit, outbox, routing_plans

router = APIRouter(prefix="/routing-plans", tags=["routing plans"])


@router.get("", response_model=RoutingPlanList)
def list_routing_plans(principal: Reader, db: Pool) -> RoutingPlanList:
    with db.connection() as conn:
        plans = routing_plans.list_for_tenant(conn, principal.tenant_id)
    return RoutingPlanList(items=[RoutingPlanOut(id=p.id, name=p.name) for p in plans])


@router.post("", response_model=RoutingPlanOut, status_code=status.HTTP_201_CREATED)
def create_routing_plan(body: RoutingPlanCreate, principal: Manager, db: Pool) -> RoutingPlanOut:
    """Creates the plan; its queue ``mailroom.inbound.<id>`` is declared by the outbox relay."""
    with db.connection() as conn, conn.transaction():
        plan = routing_plans.create(conn, principal.tenant_id, body.name)
        audit.record(
            conn,
            tenant_id=principal.tenant_id,
            actor=principal.subject,
            action="create",
            object_type="routing_plan",
            object_id=plan.id,
            fields=["name"],
        )
        event = RoutingPlanEvent(tenant_id=principal.tenant_id, routing_plan_id=plan.id)
        outbox.enqueue(conn, event.routing_key, event)
    return RoutingPlanOut(id=plan.id, name=plan.name)
