"""SQL for the ``routing_plans`` table."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from shared.db.pool import DictConnection


@dataclass(frozen=True)
class RoutingPlan:
    id: str
    tenant_id: str
    name: str


def create(conn: DictConnection, tenant_id: str, name: str) -> RoutingPlan:
    plan = RoutingPlan(id=str(uuid.uuid4()), tenant_id=tenant_id, name=name)
    conn.execute(
        "INSERT INTO routing_plans (id, tenant_id, name) VALUES (%s, %s, %s)",
        (plan.id, plan.tenant_id, plan.name),
    )
    return plan


def get(conn: DictConnection, tenant_id: str, plan_id: str) -> RoutingPlan | None:
    row = conn.execute(
        "SELECT id, tenant_id, name FROM routing_plans WHERE id = %s AND tenant_id = %s",
        (plan_id, tenant_id),
    ).fetchone()
    return RoutingPlan(**row) if row else None


def list_for_tenant(conn: DictConnection, tenant_id: str) -> list[RoutingPlan]:
    rows = conn.execute(
        "SELECT id, tenant_id, name FROM routing_plans WHERE tenant_id = %s"
        " ORDER BY created_at, id",
        (tenant_id,),
    ).fetchall()
    return [RoutingPlan(**row) for row in rows]
