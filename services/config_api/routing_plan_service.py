"""Routing plans: the contact center's queues that receive a mailbox's mail.

Creating one writes the plan, its audit entry and its event in one transaction; the outbox
relay declares the plan's queue ``mailroom.inbound.<id>`` when it publishes the event.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg_pool import ConnectionPool

from shared.contracts import RoutingPlanEvent
from shared.db import audit, outbox, routing_plans
from shared.db.pool import DictConnection
from shared.db.routing_plans import RoutingPlan
from shared.tokens import Principal


@dataclass
class RoutingPlanService:
    pool: ConnectionPool[DictConnection]

    def list_plans(self, principal: Principal) -> list[RoutingPlan]:
        with self.pool.connection() as conn:
            return routing_plans.list_for_tenant(conn, principal.tenant_id)

    def create(self, principal: Principal, name: str) -> RoutingPlan:
        with self.pool.connection() as conn, conn.transaction():
            plan = routing_plans.create(conn, principal.tenant_id, name)
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
        return plan
