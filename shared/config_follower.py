"""A worker that follows config events and keeps a :class:`ServerDirectory` current.

The fetcher, sender and status services each subclass it, naming the server types they serve
and what to do when one of those servers appears, changes or goes away.
"""

from __future__ import annotations

import logging

from psycopg_pool import ConnectionPool

from shared.db.pool import DictConnection
from shared.email_servers import EmailServer, ServerType
from shared.server_directory import ServerDirectory
from shared.settings import Settings
from shared.topology import config_events_queue
from shared.worker import Subscription, Worker

log = logging.getLogger(__name__)


class ConfigFollower(Worker):
    server_types: tuple[ServerType, ...] = tuple(ServerType)

    def __init__(self, settings: Settings, pool: ConnectionPool[DictConnection]) -> None:
        super().__init__(settings.amqp_url)
        self.directory = ServerDirectory(
            pool, self.server_types, self.on_server_change, settings.config_resync_seconds
        )

    def subscriptions(self) -> list[Subscription]:
        return [Subscription(config_events_queue(self.service_name), self.directory.handle_event)]

    def on_connected(self) -> None:
        # Events sent while this instance was disconnected went to no queue of ours.
        self.directory.resync_soon()
        self.directory.tick()

    def tick(self) -> None:
        self.directory.tick()

    def on_handler_error(self, subscription: Subscription) -> None:
        self.directory.resync_soon()

    def on_server_change(self, before: EmailServer | None, after: EmailServer | None) -> None:
        """Override: a server appeared (``before`` None), changed, or left (``after`` None)."""
        if after is None:
            log.info("%s: server %s removed", self.service_name, before.id if before else "?")
        else:
            log.info(
                "%s: server %s (%s, version %d) %s",
                self.service_name,
                after.id,
                after.type.value,
                after.version,
                "enabled" if after.enabled else "disabled",
            )
