"""The status service's consumer: config events, workers' status reports, and the clock.

- Config events (its own queue, via :class:`ConfigFollower`): a server appears, changes or goes;
  its status becomes ``connecting``/``disabled`` or is removed (``state.configure``).
- Status reports (queue ``mailroom.status.reports``, shared by every replica): folded into the
  server's status (``state.apply_report``).
- About once a second: enabled inbound servers nobody reported on turn ``stale``; waiting
  alerts are relayed to ``mailroom.status``; the state gauge is refreshed. Every minute the
  stored statuses are reconciled with the configuration (:meth:`StatusWorker.reconcile`).

**Redis away.** Every status lives in Redis, so while it is away there is nothing to keep:
a report is dropped (the next one says the same), a config change and the clock's work wait,
one warning says so, and the consumer goes on (an error escaping it would end its thread while
the HTTP side kept the process up). Once Redis answers, the statuses are reconciled: a server
saved meanwhile gets its status, a deleted one loses it, and so does every server after Redis
lost its data.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import psycopg
import redis
from kombu import Message
from psycopg_pool import ConnectionPool
from pydantic import ValidationError

from services.status import metrics
from services.status.alerts import AlertRelay
from services.status.state import (
    Change,
    Rules,
    ServerStatus,
    apply_report,
    check_stale,
    configure,
    now,
)
from services.status.store import StatusStore
from shared.config_follower import ConfigFollower
from shared.contracts.status_reports import StatusReport
from shared.db import email_servers as repo
from shared.db.pool import DictConnection
from shared.email_servers import EmailServer
from shared.oauth.health import OAuthHealth
from shared.settings import Settings
from shared.topology import status_reports_queue
from shared.worker import PermanentMessageError, Subscription

log = logging.getLogger(__name__)

GAUGE_REFRESH_SECONDS = 5.0
RECONCILE_SECONDS = 60.0


class StatusWorker(ConfigFollower):
    service_name = "status"

    def __init__(
        self,
        settings: Settings,
        pool: ConnectionPool[DictConnection],
        store: StatusStore | None = None,
    ) -> None:
        self.store = store or StatusStore.from_url(settings.redis_url)
        self.rules = Rules.from_settings(settings)
        self.alerts = AlertRelay(self.store.redis, settings.amqp_url)
        self._pool = pool
        self.oauth_health = OAuthHealth(
            pool, settings.oauth_provider_table, settings.oauth_warning_days
        )
        self._gauge_refreshed = 0.0
        self._reconciled = time.monotonic()
        self._reconcile_due = False
        self._redis_away = False  # since a call failed, until the clock's work succeeds
        self.reports_applied = 0
        super().__init__(settings, pool)

    def subscriptions(self) -> list[Subscription]:
        return [
            *super().subscriptions(),
            Subscription(status_reports_queue(), self.handle_report, prefetch=200),
        ]

    # --- config ----------------------------------------------------------------------------

    def on_server_change(self, before: EmailServer | None, after: EmailServer | None) -> None:
        super().on_server_change(before, after)
        try:
            if after is None:
                if before is not None:
                    self.store.remove(before.id)
                    metrics.forget(before.id)
                return
            self._configure(after)
        except redis.RedisError as exc:
            self._redis_failed(exc)  # the directory knows the change; reconciled later

    def _configure(self, server: EmailServer) -> None:
        def configured(current: ServerStatus | None) -> ServerStatus | None:
            if current is not None and current.version > server.version:
                return None  # a replica that knows a newer version wrote it: keep it
            return configure(current, server, now())

        change = self.store.update(server.id, configured)
        if change is not None:
            self._changed(change)

    # --- reports ---------------------------------------------------------------------------

    def handle_report(self, body: Any, message: Message) -> None:
        try:
            report = StatusReport.model_validate(body)
        except ValidationError as exc:
            raise PermanentMessageError(f"not a status report: {exc}") from exc
        metrics.REPORTS.labels(report.server_type.value, str(report.ok).lower()).inc()
        try:
            self._apply(report)
        except redis.RedisError as exc:
            self._redis_failed(exc)  # dropped: the worker's next report says the same

    def _apply(self, report: StatusReport) -> None:
        known = self.store.get(report.server_id)
        behind = known is None or known.version < report.server_version
        # The worker saw the config event before this service did: catch up first.
        if behind and not self._catch_up(report.server_id):
            return
        change = self.store.update(
            report.server_id,
            lambda current: apply_report(current, report, self.rules, now()) if current else None,
        )
        self.reports_applied += 1
        if change is not None:
            self._changed(change)

    def _catch_up(self, server_id: str) -> bool:
        if not repo.is_valid_id(server_id):
            return False
        try:
            with self._pool.connection() as conn:
                server = repo.get(conn, server_id)
        except psycopg.Error as exc:
            log.warning("status: database unavailable (%s); report kept for later", exc)
            raise
        if server is None:
            return False  # deleted meanwhile: nothing to report on
        self._configure(server)
        return True

    # --- the clock -------------------------------------------------------------------------

    def tick(self) -> None:
        super().tick()
        try:
            self._clock()
        except redis.RedisError as exc:
            self._redis_failed(exc)
            return
        if self._redis_away:
            self._redis_away = False
            log.warning("status: Redis is back; statuses reconciled with the configuration")

    def _clock(self) -> None:
        monotonic = time.monotonic()
        if self._reconcile_due or monotonic - self._reconciled >= RECONCILE_SECONDS:
            self.reconcile()
            self._reconciled = monotonic
        self.check_stale()
        self.alerts.relay()
        if monotonic - self._gauge_refreshed >= GAUGE_REFRESH_SECONDS:
            self._gauge_refreshed = monotonic
            metrics.refresh(self.store.many(s.id for s in self.directory.all()).values())

    def _redis_failed(self, exc: redis.RedisError) -> None:
        self._reconcile_due = True
        if not self._redis_away:
            self._redis_away = True
            log.warning(
                "status: Redis unavailable (%s); reports are dropped and changes wait until it"
                " is back",
                exc,
            )

    def check_stale(self) -> None:
        enabled = [s.id for s in self.directory.all() if s.enabled and s.type.inbound]
        at = now()
        for server_id, status in self.store.many(enabled).items():
            if check_stale(status, self.rules, at) is None:
                continue
            change = self.store.update(server_id, self._stale_or_none)
            if change is not None:
                self._changed(change)

    def _changed(self, change: Change) -> None:
        server = self.directory.get(change.server_id)
        metrics.changed(change, server.type.value if server else None)

    def _stale_or_none(self, current: ServerStatus | None) -> ServerStatus | None:
        return check_stale(current, self.rules, now()) if current else None

    def reconcile(self) -> None:
        """Every configured server has a status, and no other server has one: heals what a
        change met while Redis was away, Redis losing its data, and servers deleted while no
        status service ran. A status that already fits its server is left as it is."""
        if not self.directory.current:
            return  # not read yet, or behind the database: what it lacks may well exist
        servers = self.directory.all()
        stored = self.store.many(server.id for server in servers)
        for server in servers:
            status = stored.get(server.id)
            if status is None or status.version < server.version:
                self._configure(server)
        orphans = self.store.known_ids() - {server.id for server in servers}
        for server_id in self._deleted(orphans):
            self.store.remove(server_id)
            metrics.forget(server_id)
        self._reconcile_due = False

    def _deleted(self, server_ids: set[str]) -> set[str]:
        """Of servers this replica does not know, those the database does not hold either
        (one may have been created since its directory was read)."""
        if not server_ids:
            return set()
        try:
            with self._pool.connection() as conn:
                return server_ids - repo.existing_ids(conn, server_ids)
        except psycopg.Error as exc:
            log.warning("status: database unavailable (%s); orphaned statuses stay for now", exc)
            return set()

    def on_stopped(self) -> None:
        self.alerts.close()
