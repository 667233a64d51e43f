"""What an admin can do with the company's mail servers, each a single transaction.

Every change writes the row, an audit entry and its config event (outbox) together, so a change
and its event either both happen or neither does. The connection test runs before the
transaction: it talks to the network and must not hold row locks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from psycopg_pool import ConnectionPool

from services.config_api.errors import (
    Conflict,
    ConnectionFailed,
    FieldsInvalid,
    NotFound,
    PreconditionFailed,
    TooBusy,
)
from services.config_api.oauth_consent import (
    CONSENT_FIELD,
    ConsentOutcome,
    ConsentUnavailable,
    OAuthConsents,
    same_account,
)
from services.config_api.schemas import NAME_MAX_LENGTH, ServerCreate, ServerPatch
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
from shared.db import oauth as oauth_repo
from shared.db.pool import DictConnection
from shared.email_servers import CONNECTION_SETTINGS, AuthType, EmailServer, ServerType
from shared.oauth.health import OAuthHealth
from shared.probe import Probe, ProbeResult
from shared.secrets import SecretBox, SecretDecryptError
from shared.tenant_slots import NoSlot, TenantSlots
from shared.tokens import Principal

CONNECTION_COLUMNS = frozenset({*CONNECTION_SETTINGS, "enabled"})
CONNECTION_FIELDS = CONNECTION_COLUMNS | {"password"}
COPY_SUFFIX = " (copy)"
# Columns a connection test writes, not the admin: never named as changed fields.
TEST_RESULTS = frozenset({"last_connection", "starttls_seen_at"})
# How each protocol names the upgrade to TLS on a plain connection.
_STARTTLS_NAME = {ServerType.IMAP: "STARTTLS", ServerType.POP3: "STLS", ServerType.SMTP: "STARTTLS"}


def copy_name(name: str) -> str:
    """``"<name> (copy)"``, the original shortened so that the result stays within 200."""
    room = NAME_MAX_LENGTH - len(COPY_SUFFIX)
    base = name if len(name) <= room else name[:room].rstrip()
    return base + COPY_SUFFIX


def _candidate(tenant_id: str, columns: dict[str, Any], server_id: str = "") -> EmailServer:
    """An unsaved server built from columns, for the connection test."""
    values = {**columns, "sender_addresses": tuple(columns.get("sender_addresses") or ())}
    return EmailServer(id=server_id, tenant_id=tenant_id, version=0, **values)


def saw_starttls(server: EmailServer, result: ProbeResult) -> bool:
    """The test upgraded a plain connection with STARTTLS (STLS): from now on this host and
    port get credentials only over TLS (``EmailServer.requires_tls``)."""
    return result.ok and not server.tls and _STARTTLS_NAME[server.type] in result.capabilities


@dataclass(frozen=True)
class SavedServer:
    """A saved server, and for an OAuth2 server that needs consent, where to give it."""

    server: EmailServer
    authorization_url: str | None = None
    notes: tuple[str, ...] = ()


@dataclass
class EmailServerService:
    pool: ConnectionPool[DictConnection]
    secret_box: SecretBox
    probe: Probe
    consents: OAuthConsents
    oauth_health: OAuthHealth
    probe_slots: TenantSlots = field(
        default_factory=lambda: TenantSlots("connection tests", total=8, per_tenant=2)
    )
    probe_seconds: float = 10.0  # how long a test may take: the Retry-After of a busy answer

    # --- reads -----------------------------------------------------------------------------

    def list_servers(
        self, principal: Principal, server_type: ServerType | None
    ) -> list[EmailServer]:
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
        return self._run_probe(candidate, merged.new_password)

    def _test_before_save(
        self, principal: Principal, merged: MergedServer, password: str | None, server_id: str = ""
    ) -> None:
        candidate = _candidate(principal.tenant_id, merged.columns, server_id)
        result = self._run_probe(candidate, password)
        if not result.ok:
            raise ConnectionFailed(result)
        merged.columns["last_connection"] = merged.changes["last_connection"] = result.as_json()
        if saw_starttls(candidate, result):
            merged.columns["starttls_seen_at"] = merged.changes["starttls_seen_at"] = (
                candidate.place
            )

    def _run_probe(
        self, candidate: EmailServer, password: str | None, wait_seconds: float = 0.0
    ) -> ProbeResult:
        """Connection tests wait on the network, so few run at once, and one tenant may run
        only some of them: slow mail servers named by one tenant cannot occupy the request
        threads that another tenant's saves need (429 with ``Retry-After`` when none is free)."""
        try:
            slot = self.probe_slots.take(candidate.tenant_id, wait_seconds)
        except NoSlot as refusal:
            raise TooBusy(refusal, self.probe_seconds) from None
        try:
            return self.probe(candidate, password)
        finally:
            slot.release()

    # --- writes ----------------------------------------------------------------------------

    def create(self, principal: Principal, body: ServerCreate) -> SavedServer:
        merged = self._merge(None, body, body.type)
        self._check_routing_plan(principal, merged.columns.get("routing_plan_id"))
        oauth2 = merged.columns["auth_type"] is AuthType.OAUTH2
        # A new OAuth2 server has no tokens to test with: the consent's callback tests it.
        if merged.columns["enabled"] and not oauth2:
            self._test_before_save(principal, merged, merged.new_password)
        with self.pool.connection() as conn, conn.transaction():
            if merged.columns["is_template_server"]:
                self._lock_template_choice(conn, principal)
                self._clear_template_server(conn, principal)
            server = repo.insert(conn, principal.tenant_id, merged.columns)
            self._record(conn, principal, "create", server, "created", merged.changed_fields)
        return self._with_consent(principal, server, needed=oauth2)

    def patch(
        self, principal: Principal, server_id: str, body: ServerPatch, if_match: int | None
    ) -> SavedServer:
        current = self.get(principal, server_id)
        if if_match is not None and current.version != if_match:
            raise PreconditionFailed(current.version)  # before a connection test, not after
        merged = self._merge(current, body, current.type)
        self._check_routing_plan(principal, merged.changes.get("routing_plan_id"))
        candidate = _candidate(principal.tenant_id, merged.columns, server_id)
        oauth2 = candidate.auth_type is AuthType.OAUTH2
        usable = oauth2 and self.consents.has_usable_tokens(candidate, current)
        # Consent is asked for when the box is ticked or no usable tokens exist. An OAuth2
        # server is tested with its current tokens while it has some; one that has none yet
        # is tested by the consent's callback.
        consent = oauth2 and (candidate.reauthenticate_on_save or not usable)
        tested = self._needs_test(body, merged) and (usable or not oauth2)
        if tested:
            password = merged.new_password
            if candidate.auth_type is AuthType.OAUTH2:
                password = self.consents.access_token_for_test(candidate)
            elif password is None and merged.columns["password_encrypted"] is not None:
                password = self._decrypt_stored(merged.columns["password_encrypted"])
            self._test_before_save(principal, merged, password, server_id)
        with self.pool.connection() as conn, conn.transaction():
            self._lock_template_choice(conn, principal)
            locked = repo.get(conn, server_id, tenant_id=principal.tenant_id, for_update=True)
            if locked is None:
                raise NotFound()
            if if_match is not None and locked.version != if_match:
                raise PreconditionFailed(locked.version)
            if locked.version != current.version:
                merged = self._merge_again(locked, current, body, merged, tested)
            if merged.changes.get("is_template_server"):
                self._clear_template_server(conn, principal, keep=server_id)
            if not same_account(locked, candidate):
                oauth_repo.forget(conn, server_id)
            server = repo.update(conn, server_id, merged.changes)
            self._record(conn, principal, "update", server, "updated", merged.changed_fields)
        return self._with_consent(principal, server, needed=consent)

    def _with_consent(self, principal: Principal, server: EmailServer, needed: bool) -> SavedServer:
        if not needed:
            return SavedServer(server)
        try:
            return SavedServer(server, self.consents.start(principal.subject, server))
        except ConsentUnavailable as exc:
            return SavedServer(server, None, (f"Consent cannot start: {exc.reason}",))

    def start_consent(self, principal: Principal, server_id: str) -> str:
        """A new authorization URL for an OAuth2 server (the last one expired, or the provider
        asks for consent again)."""
        server = self.get(principal, server_id)
        if server.auth_type is not AuthType.OAUTH2:
            raise FieldsInvalid([FieldError("auth_type", "consent applies to OAuth2 servers only")])
        try:
            return self.consents.start(principal.subject, server)
        except ConsentUnavailable as exc:
            raise FieldsInvalid([FieldError("oauth_provider", exc.reason)]) from exc

    def finish_consent(
        self, state: str, code: str | None, error: str | None, error_description: str | None
    ) -> ConsentOutcome:
        """The provider's callback: tokens stored, connection tested, workers told."""
        consent, server, outcome = self.consents.finish(state, code, error, error_description)
        if not outcome.ok or consent is None or server is None:
            return outcome
        try:
            # The consent is used up: rather wait for a slot than turn the admin away.
            result = self._run_probe(
                server, self.consents.access_token_for_test(server), self.probe_seconds
            )
        except TooBusy as busy:
            reason = f"the connection test could not run now ({busy.payload['detail']})"
            result = ProbeResult(False, reason)
        admin = Principal(
            subject=consent.admin, tenant_id=consent.tenant_id, permissions=frozenset()
        )
        with self.pool.connection() as conn, conn.transaction():
            locked = repo.get(conn, server.id, tenant_id=consent.tenant_id, for_update=True)
            if locked is None:
                return ConsentOutcome(False, "The mail server was deleted meanwhile.", server.id)
            tested: dict[str, Any] = {"last_connection": result.as_json()}
            if saw_starttls(server, result) and locked.place == server.place:
                tested["starttls_seen_at"] = server.place
            saved = repo.update(conn, server.id, tested)
            self._record(conn, admin, "oauth_consent", saved, "updated", {CONSENT_FIELD})
        if result.ok:
            message = "Access granted, and the connection test passed."
        else:
            message = f"Access granted, but the connection test failed: {result.reason}"
        if outcome.note:
            message = f"{message} {outcome.note}"
        return ConsentOutcome(result.ok, message, server.id, result, outcome.note)

    def _needs_test(self, body: ServerPatch, merged: MergedServer) -> bool:
        enabling = body.enabled is True and "enabled" in body.model_fields_set
        return bool(
            merged.columns["enabled"] and (enabling or merged.changed_fields & CONNECTION_FIELDS)
        )

    def _merge_again(
        self,
        locked: EmailServer,
        read: EmailServer,
        body: ServerPatch,
        tested_merge: MergedServer,
        tested: bool,
    ) -> MergedServer:
        """Someone saved the server while this request was checked: judge it again.

        The rules are checked on what is stored now. When the connection test ran (or would now
        be needed) on settings that are no longer the ones to be saved, the admin must retry:
        an enabled server is never saved with settings nobody tested.
        """
        merged = self._merge(locked, body, locked.type)
        same_password = (
            merged.new_password is not None or locked.password_encrypted == read.password_encrypted
        )
        connection = sorted(CONNECTION_COLUMNS)
        same_settings = same_password and all(
            merged.columns[name] == tested_merge.columns[name] for name in connection
        )
        if (tested or self._needs_test(body, merged)) and not (tested and same_settings):
            raise Conflict(
                "the server was changed by someone else while its connection was tested; "
                "reload it and save again"
            )
        if tested:
            for result in ("last_connection", "starttls_seen_at"):
                if result in tested_merge.changes:
                    merged.columns[result] = merged.changes[result] = tested_merge.changes[result]
        return merged

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
            # The same place, so the same secrets, and the same STARTTLS pin (columns_of).
            columns = columns_of(source)
            columns.update(name=copy_name(source.name), enabled=False, is_template_server=False)
            copy = repo.insert(conn, principal.tenant_id, columns)
            fields = {name for name, value in columns.items() if value not in (None, [], "")}
            fields = (fields - {"password_encrypted", *TEST_RESULTS}) | (
                {"password"} if copy.has_password else set()
            )
            self._record(conn, principal, "duplicate", copy, "created", fields)
        return copy

    def set_template_server(self, principal: Principal, server_id: str | None) -> str | None:
        with self.pool.connection() as conn, conn.transaction():
            self._lock_template_choice(conn, principal)
            if server_id is None:
                self._clear_template_server(conn, principal)
                return None
            target = repo.get(conn, server_id, tenant_id=principal.tenant_id, for_update=True)
            if target is None:
                raise NotFound()
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
                oauth_provider_names=set(self.consents.tokens.providers),
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

    @staticmethod
    def _lock_template_choice(conn: DictConnection, principal: Principal) -> None:
        """Serialise changes of a tenant's template server (at most one, REQUIREMENTS).

        Two admins ticking different servers at once would otherwise both find "none ticked"
        and both tick; the unique index would then turn the second into an error.
        """
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
            (f"mailroom.template-server:{principal.tenant_id}",),
        )

    def _decrypt_stored(self, token: bytes) -> str:
        try:
            return self.secret_box.decrypt(token)
        except SecretDecryptError as exc:
            raise FieldsInvalid(
                [
                    FieldError(
                        "password",
                        "is stored under an encryption key this installation no longer has; "
                        "enter the password again",
                    )
                ]
            ) from exc

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
        fields = sorted(set(fields) - TEST_RESULTS)
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
