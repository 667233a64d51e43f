"""The status service's consumer: config events, workers' status reports, and the clock.

- Config events (its own queue, via :class:`ConfigFollower`): a server appears, changes or goes;
  its status becomes ``connecting``/``disabled`` or is removed (``state.configure``).
- Status reports (queue ``mailroom.status.reports``, shared by every replica): folded into the
  server's status (``state.apply_report``).
- About once a second: enabled inbound servers nobody reported on turn ``stale``; waiting
  alerts are relayed to ``mailroom.status``; the state gauge is refreshed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import psycopg
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
CLEANUP_SECONDS = 60.0


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
        self._cleaned = time.monotonic()
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
        if after is None:
            if before is not None:
                self.store.remove(before.id)
                metrics.forget(before.id)
            return
        self._configure(after)

    def _configure(self, server: EmailServer) -> None:
        change = self.store.update(server.id, lambda current: configure(current, server, now()))
        if change is not None:
            self._changed(change)

    # --- reports ---------------------------------------------------------------------------

    def handle_report(self, body: Any, message: Message) -> None:
        try:
            report = StatusReport.model_validate(body)
        except ValidationError as exc:
            raise PermanentMessageError(f"not a status report: {exc}") from exc
        metrics.REPORTS.labels(report.server_type.value, str(report.ok).lower()).inc()
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
        self.check_stale()
        self.alerts.relay()
        monotonic = time.monotonic()
        if monotonic - self._gauge_refreshed >= GAUGE_REFRESH_SECONDS:
            self._gauge_refreshed = monotonic
            metrics.refresh(self.store.many(s.id for s in self.directory.all()).values())
        if monotonic - self._cleaned >= CLEANUP_SECONDS:
            self._cleaned = monotonic
            self._forget_unknown()

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

    def _forget_unknown(self) -> None:
        """Statuses of servers deleted while no status service was running."""
        known = {server.id for server in self.directory.all()}
        for server_id in self.store.known_ids() - known:
            self.store.remove(server_id)

    def on_stopped(self) -> None:
        self.alerts.close()
