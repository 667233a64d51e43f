"""What an admin can do with the company's mail servers, each a single transaction.

Every change writes the row, an audit entry and its config event (outbox) together, so a change
and its event either both happen or neither does. The connection test runs before the
transaction: it talks to the network and must not hold row locks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from psycopg_pool import ConnectionPool

from services.config_api.errors import ConnectionFailed, FieldsInvalid, NotFound, PreconditionFailed
from services.config_api.schemas import ServerCreate, ServerPatch
from services.config_api.server_rules import (
    FieldError,
    MergedServer,
    ServerRulesError,
    columns_of,
    merge,
)
from shared.contracts import ConfigEvent, EmailServerChange
from shared.db import audit, outbox, routing_plans
from shared.db import email_servers as repo
from shared.db.pool import DictConnection
from shared.email_servers import EmailServer, ServerType
from shared.probe import Probe, ProbeResult
from shared.secrets import SecretBox
from shared.tokens import Principal

# A change to any of these on an enabled server is tested before it is saved.
CONNECTION_FIELDS = frozenset(
    {
        "host",
        "port",
        "tls",
        "auth_type",
        "username",
        "password",
        "inbox_folder",
        "sni_hostname",
        "disable_compression",
        "routing_plan_id",
        "enabled",
        "oauth_provider",
    }
)
COPY_SUFFIX = " (copy)"
NAME_LIMIT = 200


def copy_name(name: str) -> str:
    """``"<name> (copy)"``, the original shortened so that the result stays within 200."""
    room = NAME_LIMIT - len(COPY_SUFFIX)
    base = name if len(name) <= room else name[:room].rstrip()
    return base + COPY_SUFFIX


def _candidate(tenant_id: str, columns: dict[str, Any], server_id: str = "") -> EmailServer:
    """An unsaved server built from columns, for the connection test."""
    values = {**columns, "sender_addresses": tuple(columns.get("sender_addresses") or ())}
    return EmailServer(id=server_id, tenant_id=tenant_id, version=0, **values)


@dataclass
class EmailServerService:
    pool: ConnectionPool[DictConnection]
    secret_box: SecretBox
    probe: Probe
    probe_timeout: float
    oauth_provider_names: set[str]

    # --- reads -----------------------------------------------------------------------------

    def list(self, principal: Principal, server_type: ServerType | None) -> list[EmailServer]:
        with self.pool.connection() as conn:
            return repo.list_for_tenant(conn, principal.tenant_id, server_type)

    def get(self, principal: Principal, server_id: str) -> EmailServer:
        with self.pool.connection() as conn:
            server = repo.get(conn, server_id, tenant_id=principal.tenant_id)
        if server is None:
            raise NotFound()
        return server

    def template_server_id(self, principal: Principal) -> str | None:
        with self.pool.connection() as conn:
            server = repo.template_server(conn, principal.tenant_id)
        return server.id if server else None

    # --- connection test -------------------------------------------------------------------

    def test(self, principal: Principal, body: ServerCreate) -> ProbeResult:
        merged = self._merge(None, body, body.type)
        self._check_routing_plan(principal, merged.columns.get("routing_plan_id"))
        candidate = _candidate(principal.tenant_id, merged.columns)
        return self.probe(candidate, merged.new_password, self.probe_timeout)

    def _test_before_save(
        self, principal: Principal, merged: MergedServer, password: str | None, server_id: str = ""
    ) -> None:
        candidate = _candidate(principal.tenant_id, merged.columns, server_id)
        result = self.probe(candidate, password, self.probe_timeout)
        if not result.ok:
            raise ConnectionFailed(result)
        merged.columns["last_connection"] = merged.changes["last_connection"] = result.as_json()

    # --- writes ----------------------------------------------------------------------------

    def create(self, principal: Principal, body: ServerCreate) -> EmailServer:
        merged = self._merge(None, body, body.type)
        self._check_routing_plan(principal, merged.columns.get("routing_plan_id"))
        if merged.columns["enabled"]:
            self._test_before_save(principal, merged, merged.new_password)
        with self.pool.connection() as conn, conn.transaction():
            if merged.columns["is_template_server"]:
                self._clear_template_server(conn, principal)
            server = repo.insert(conn, principal.tenant_id, merged.columns)
            self._record(conn, principal, "create", server, "created", merged.changed_fields)
        return server

    def patch(
        self, principal: Principal, server_id: str, body: ServerPatch, if_match: int | None
    ) -> EmailServer:
        current = self.get(principal, server_id)
        merged = self._merge(current, body, current.type)
        self._check_routing_plan(principal, merged.changes.get("routing_plan_id"))
        enabling = body.enabled is True and "enabled" in body.model_fields_set
        if merged.columns["enabled"] and (enabling or merged.changed_fields & CONNECTION_FIELDS):
            password = merged.new_password
            if password is None and merged.columns["password_encrypted"] is not None:
                password = self.secret_box.decrypt(merged.columns["password_encrypted"])
            self._test_before_save(principal, merged, password, server_id)
        with self.pool.connection() as conn, conn.transaction():
            locked = repo.get(conn, server_id, tenant_id=principal.tenant_id, for_update=True)
            if locked is None:
                raise NotFound()
            if if_match is not None and locked.version != if_match:
                raise PreconditionFailed(locked.version)
            if merged.changes.get("is_template_server"):
                self._clear_template_server(conn, principal, keep=server_id)
            server = repo.update(conn, server_id, merged.changes)
            self._record(conn, principal, "update", server, "updated", merged.changed_fields)
        return server

    def delete(self, principal: Principal, server_id: str) -> None:
        with self.pool.connection() as conn, conn.transaction():
            server = repo.get(conn, server_id, tenant_id=principal.tenant_id, for_update=True)
            if server is None:
                raise NotFound()
            repo.delete(conn, server_id)
            # Consumers order events by version: a deletion comes after every update.
            gone = replace(server, version=server.version + 1, enabled=False)
            self._record(conn, principal, "delete", gone, "deleted", ())

    def duplicate(self, principal: Principal, server_id: str) -> EmailServer:
        with self.pool.connection() as conn, conn.transaction():
            source = repo.get(conn, server_id, tenant_id=principal.tenant_id)
            if source is None:
                raise NotFound()
            columns = columns_of(source)
            columns.update(name=copy_name(source.name), enabled=False, is_template_server=False)
            copy = repo.insert(conn, principal.tenant_id, columns)
            fields = {name for name, value in columns.items() if value not in (None, [], "")}
            fields = (fields - {"password_encrypted"}) | (
                {"password"} if copy.has_password else set()
            )
            self._record(conn, principal, "duplicate", copy, "created", fields)
        return copy

    def set_template_server(self, principal: Principal, server_id: str | None) -> str | None:
        with self.pool.connection() as conn, conn.transaction():
            if server_id is None:
                self._clear_template_server(conn, principal)
                return None
            target = repo.get(conn, server_id, tenant_id=principal.tenant_id, for_update=True)
            if target is None:
                raise FieldsInvalid([FieldError("server_id", "is not a mail server of yours")])
            if target.type is not ServerType.SMTP:
                raise FieldsInvalid([FieldError("server_id", "must be an SMTP server")])
            if not target.is_template_server:
                self._clear_template_server(conn, principal)
                server = repo.update(conn, server_id, {"is_template_server": True})
                self._record(conn, principal, "update", server, "updated", {"is_template_server"})
            return server_id

    # --- helpers ---------------------------------------------------------------------------

    def _merge(
        self, current: EmailServer | None, body: ServerCreate | ServerPatch, server_type: ServerType
    ) -> MergedServer:
        try:
            return merge(
                current,
                body,
                server_type=server_type,
                secret_box=self.secret_box,
                oauth_provider_names=self.oauth_provider_names,
            )
        except ServerRulesError as exc:
            raise FieldsInvalid(exc.errors) from exc

    def _check_routing_plan(self, principal: Principal, plan_id: str | None) -> None:
        if plan_id is None:
            return
        with self.pool.connection() as conn:
            plan = routing_plans.get(conn, principal.tenant_id, plan_id)
        if plan is None:
            raise FieldsInvalid([FieldError("routing_plan_id", "is not a routing plan of yours")])

    def _clear_template_server(
        self, conn: DictConnection, principal: Principal, keep: str | None = None
    ) -> None:
        current = repo.template_server(conn, principal.tenant_id, for_update=True)
        if current is not None and current.id != keep:
            server = repo.update(conn, current.id, {"is_template_server": False})
            self._record(conn, principal, "update", server, "updated", {"is_template_server"})

    @staticmethod
    def _record(
        conn: DictConnection,
        principal: Principal,
        action: str,
        server: EmailServer,
        change: EmailServerChange,
        fields: Iterable[str],
    ) -> None:
        fields = sorted(set(fields) - {"last_connection"})
        audit.record(
            conn,
            tenant_id=principal.tenant_id,
            actor=principal.subject,
            action=action,
            object_type="email_server",
            object_id=server.id,
            fields=fields,
        )
        event = ConfigEvent(
            change=change,
            tenant_id=server.tenant_id,
            server_id=server.id,
            server_type=server.type,
            version=server.version,
            enabled=server.enabled,
            changed_fields=tuple(fields),
        )
        outbox.enqueue(conn, event.routing_key, event)
