"""The audit trail: who changed what, when. Field names only, never a value."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from shared.db.pool import DictConnection


def record(
    conn: DictConnection,
    *,
    tenant_id: str,
    actor: str,
    action: str,
    object_type: str,
    object_id: str,
    fields: Iterable[str] = (),
) -> None:
    conn.execute(
        "INSERT INTO audit_log (tenant_id, actor, action, object_type, object_id, fields)"
        " VALUES (%s, %s, %s, %s, %s, %s)",
        (tenant_id, actor, action, object_type, object_id, sorted(set(fields))),
    )


def entries(
    conn: DictConnection, tenant_id: str, object_id: str | None = None
) -> list[dict[str, Any]]:
    if object_id is None:
        return conn.execute(
            "SELECT * FROM audit_log WHERE tenant_id = %s ORDER BY id", (tenant_id,)
        ).fetchall()
    return conn.execute(
        "SELECT * FROM audit_log WHERE tenant_id = %s AND object_id = %s ORDER BY id",
        (tenant_id, object_id),
    ).fetchall()
