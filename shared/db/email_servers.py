"""SQL for the ``email_servers`` table. Callers own the transaction."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb

from shared.db.pool import DictConnection
from shared.email_servers import AuthType, EmailServer, Role, ServerType

# Columns an update may set, the way the config API names them.
WRITABLE_COLUMNS = (
    "type",
    "name",
    "description",
    "host",
    "port",
    "tls",
    "auth_type",
    "username",
    "password_encrypted",
    "reauthenticate_on_save",
    "inbox_folder",
    "sni_hostname",
    "disable_compression",
    "routing_plan_id",
    "sender_addresses",
    "enabled",
    "role",
    "is_template_server",
    "oauth_provider",
    "last_connection",
    "starttls_seen_at",
)


def _to_model(row: Mapping[str, Any]) -> EmailServer:
    return EmailServer(
        id=str(row["id"]),
        tenant_id=row["tenant_id"],
        type=ServerType(row["type"]),
        name=row["name"],
        description=row["description"],
        host=row["host"],
        port=row["port"],
        tls=row["tls"],
        auth_type=AuthType(row["auth_type"]),
        username=row["username"],
        password_encrypted=(
            bytes(row["password_encrypted"]) if row["password_encrypted"] is not None else None
        ),
        reauthenticate_on_save=row["reauthenticate_on_save"],
        inbox_folder=row["inbox_folder"],
        sni_hostname=row["sni_hostname"],
        disable_compression=row["disable_compression"],
        routing_plan_id=row["routing_plan_id"],
        sender_addresses=tuple(row["sender_addresses"]),
        enabled=row["enabled"],
        role=Role(row["role"]) if row["role"] else None,
        is_template_server=row["is_template_server"],
        oauth_provider=row["oauth_provider"],
        last_connection=row["last_connection"],
        starttls_seen_at=row["starttls_seen_at"],
        version=row["version"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _adapt(column: str, value: Any) -> Any:
    if column == "last_connection" and value is not None:
        return Jsonb(value)
    if column == "sender_addresses":
        return list(value)
    return value


def is_valid_id(server_id: str) -> bool:
    try:
        uuid.UUID(server_id)
    except ValueError:
        return False
    return True


def existing_ids(conn: DictConnection, server_ids: Iterable[str]) -> set[str]:
    """Which of these servers the database holds (an id that is no UUID: none)."""
    valid = [i for i in server_ids if is_valid_id(i)]
    if not valid:
        return set()
    rows = conn.execute(
        "SELECT id::text AS id FROM email_servers WHERE id = ANY(%s::uuid[])", (valid,)
    ).fetchall()
    return {str(row["id"]) for row in rows}


def get(
    conn: DictConnection, server_id: str, *, tenant_id: str | None = None, for_update: bool = False
) -> EmailServer | None:
    """One server; with ``tenant_id`` only if it belongs to that tenant."""
    if not is_valid_id(server_id):
        return None
    query = "SELECT * FROM email_servers WHERE id = %s"
    params: list[Any] = [server_id]
    if tenant_id is not None:
        query += " AND tenant_id = %s"
        params.append(tenant_id)
    if for_update:
        query += " FOR UPDATE"
    row = conn.execute(query, params).fetchone()
    return _to_model(row) if row else None


def list_for_tenant(
    conn: DictConnection, tenant_id: str, server_type: ServerType | None = None
) -> list[EmailServer]:
    if server_type is None:
        rows = conn.execute(
            "SELECT * FROM email_servers WHERE tenant_id = %s ORDER BY created_at, id",
            (tenant_id,),
        ).fetchall()
    else:
        rows = conn.execute(
            "SELECT * FROM email_servers WHERE tenant_id = %s AND type = %s"
            " ORDER BY created_at, id",
            (tenant_id, server_type.value),
        ).fetchall()
    return [_to_model(row) for row in rows]


def list_all(
    conn: DictConnection, types: tuple[ServerType, ...] | None = None
) -> list[EmailServer]:
    """Every server of every tenant (the workers' full resync)."""
    if types is None:
        rows = conn.execute("SELECT * FROM email_servers ORDER BY id").fetchall()
    else:
        rows = conn.execute(
            "SELECT * FROM email_servers WHERE type = ANY(%s) ORDER BY id",
            ([t.value for t in types],),
        ).fetchall()
    return [_to_model(row) for row in rows]


def insert(conn: DictConnection, tenant_id: str, values: Mapping[str, Any]) -> EmailServer:
    columns = ["id", "tenant_id", *values.keys()]
    params = [str(uuid.uuid4()), tenant_id, *(_adapt(c, v) for c, v in values.items())]
    query = sql.SQL("INSERT INTO email_servers ({}) VALUES ({}) RETURNING *").format(
        sql.SQL(", ").join(sql.Identifier(c) for c in columns),
        sql.SQL(", ").join(sql.Placeholder() * len(columns)),
    )
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return _to_model(row)


def update(conn: DictConnection, server_id: str, changes: Mapping[str, Any]) -> EmailServer:
    """Apply ``changes``; the version goes up on every update, whatever changed."""
    unknown = set(changes) - set(WRITABLE_COLUMNS)
    if unknown:
        raise ValueError(f"not writable: {sorted(unknown)}")
    assignments: list[sql.Composable] = [
        sql.SQL("{} = {}").format(sql.Identifier(c), sql.Placeholder()) for c in changes
    ]
    assignments.append(sql.SQL("version = version + 1, updated_at = now()"))
    query = sql.SQL("UPDATE email_servers SET {} WHERE id = %s RETURNING *").format(
        sql.SQL(", ").join(assignments)
    )
    params = [*(_adapt(c, v) for c, v in changes.items()), server_id]
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return _to_model(row)


def delete(conn: DictConnection, server_id: str) -> None:
    conn.execute("DELETE FROM email_servers WHERE id = %s", (server_id,))


def template_server(
    conn: DictConnection, tenant_id: str, *, for_update: bool = False
) -> EmailServer | None:
    query = "SELECT * FROM email_servers WHERE tenant_id = %s AND is_template_server"
    if for_update:
        query += " FOR UPDATE"
    row = conn.execute(query, (tenant_id,)).fetchone()
    return _to_model(row) if row else None
