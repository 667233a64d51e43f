"""A worker's view of the mail servers it serves, kept current by config events.

Config events carry no settings and no secrets: they say "server X changed". The directory
re-reads that server from the database, so an event delivered twice or late does no harm. A
full resync at start, after every reconnect and periodically heals any event that was missed.

A change its listener fails on is not kept: the directory goes back to what it had, so the
next resync (the next tick) tells the listener again, instead of the change being known here
and lost for the worker (a mailbox whose poller never started, a status never written).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from kombu import Message
from psycopg_pool import ConnectionPool
from pydantic import ValidationError

from shared.contracts import ConfigEvent
from shared.db import email_servers as repo
from shared.db.pool import DictConnection
from shared.email_servers import EmailServer, ServerType
from shared.logging_setup import Throttled
from shared.worker import PermanentMessageError

log = logging.getLogger(__name__)

# Called with (before, after); None means absent. Fetchers start/stop pollers here.
ChangeListener = Callable[[EmailServer | None, EmailServer | None], None]


class ServerDirectory:
    def __init__(
        self,
        pool: ConnectionPool[DictConnection],
        types: tuple[ServerType, ...],
        on_change: ChangeListener | None = None,
        resync_seconds: float = 300.0,
    ) -> None:
        self._pool = pool
        self._types = types
        self._on_change = on_change
        self._resync_seconds = resync_seconds
        self._servers: dict[str, EmailServer] = {}
        self._lock = threading.Lock()
        self._resync_due = True
        self._last_resync = 0.0
        self._synced = False
        self._failure_log = Throttled(log)  # a failure that lasts repeats every tick
        # Goes up with every change of a server: what was derived from the servers at one
        # generation (a sender's routes) holds as long as it is current.
        self.generation = 0

    # --- reads -----------------------------------------------------------------------------

    @property
    def current(self) -> bool:
        """Whether the directory is known to hold what the database does: read at least once
        (before that, no server known is not the same as no server configured) and no
        resync waiting (a read that failed, a change whose listener failed)."""
        return self._synced and not self._resync_due

    def get(self, server_id: str) -> EmailServer | None:
        with self._lock:
            return self._servers.get(server_id)

    def all(self) -> list[EmailServer]:
        with self._lock:
            return list(self._servers.values())

    # --- keeping current -------------------------------------------------------------------

    def handle_event(self, body: Any, message: Message) -> None:
        """Subscription handler for the service's config-event queue."""
        try:
            event = ConfigEvent.model_validate(body)
        except ValidationError as exc:
            raise PermanentMessageError(f"not a config event: {exc}") from exc
        self.apply(event)

    def apply(self, event: ConfigEvent) -> None:
        if event.server_type not in self._types:
            return
        log.debug(
            "config event email_server.%s server=%s version=%d",
            event.change,
            event.server_id,
            event.version,
        )
        known = self.get(event.server_id)
        if known is not None and event.change != "deleted" and known.version >= event.version:
            return  # already seen this version (or a newer one)
        try:
            with self._pool.connection() as conn:
                current = repo.get(conn, event.server_id)
        except psycopg.Error as exc:
            log.warning("database unavailable (%s); a full resync follows", exc)
            self.resync_soon()
            return
        self._replace(event.server_id, current)

    def resync_soon(self) -> None:
        self._resync_due = True

    def tick(self) -> None:
        """Resync when asked to, or when the periodic interval has passed."""
        if self._resync_due or time.monotonic() - self._last_resync >= self._resync_seconds:
            self.resync()

    def resync(self) -> None:
        try:
            with self._pool.connection() as conn:
                servers = repo.list_all(conn, self._types)
        except psycopg.Error as exc:
            log.warning("resync failed, database unavailable (%s); retrying", exc)
            self._resync_due = True
            return
        except Exception:  # noqa: BLE001 - a row this version cannot read (logged below)
            self._resync_due = True
            self._failure_log.exception("resync failed; retrying")
            return
        self._resync_due = False
        self._last_resync = time.monotonic()
        fresh = {server.id: server for server in servers}
        for server_id in set(self._servers) | set(fresh):
            try:
                self._replace(server_id, fresh.get(server_id))
            except Exception:  # noqa: BLE001 - the listener's (logged): told again next resync
                self._failure_log.exception("server %s: its change failed; tried again", server_id)
        self._synced = True

    def _replace(self, server_id: str, current: EmailServer | None) -> None:
        with self._lock:
            before = self._servers.get(server_id)
            if current is None:
                self._servers.pop(server_id, None)
            else:
                self._servers[server_id] = current
            if before != current:
                self.generation += 1
        if before == current:
            return
        if self._on_change is None:
            return
        try:
            self._on_change(before, current)
        except BaseException:
            with self._lock:  # not kept: the next resync finds the change again
                if self._servers.get(server_id) == current:
                    if before is None:
                        self._servers.pop(server_id, None)
                    else:
                        self._servers[server_id] = before
            self._resync_due = True
            raise
