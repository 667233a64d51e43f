"""The fetcher's supervisor: one poller per enabled POP3/IMAP mailbox, kept in step with config.

Config events (and the periodic resync) tell it that a server appeared, changed or went away;
within a second the server's poller is started, restarted with the new settings, or stopped.
Disabled servers are not touched. A restarted poller waits for its predecessor to end, so a
mailbox never has two sessions from one process; across processes, leases see to that.
"""

from __future__ import annotations

import logging
import threading

from psycopg_pool import ConnectionPool

from services.fetcher.imap_poller import ImapPoller
from services.fetcher.mailbox_poller import FetcherContext, MailboxPoller
from services.fetcher.pop3_poller import Pop3Poller
from services.fetcher.publisher import BrokerUnavailable, InboundPublisher
from shared.config_follower import ConfigFollower
from shared.db.pool import DictConnection
from shared.email_servers import EmailServer, ServerType
from shared.leases import Leases
from shared.login_secrets import LoginSecrets
from shared.mail.connector import Connector
from shared.oauth.tokens import OAuthTokens
from shared.redis_client import redis_client
from shared.secrets import SecretBox
from shared.settings import Settings
from shared.topology import instance_id

log = logging.getLogger(__name__)

POLLERS: dict[ServerType, type[MailboxPoller]] = {
    ServerType.IMAP: ImapPoller,
    ServerType.POP3: Pop3Poller,
}


class FetcherSupervisor(ConfigFollower):
    service_name = "fetcher"
    server_types = (ServerType.IMAP, ServerType.POP3)

    def __init__(self, settings: Settings, pool: ConnectionPool[DictConnection]) -> None:
        self.pollers: dict[str, MailboxPoller] = {}
        # Stopped pollers that may still be finishing a batch: a new poller of the same
        # mailbox waits for them, also after a disable and a quick re-enable.
        self._retiring: dict[str, MailboxPoller] = {}
        self._lock = threading.Lock()
        worker = instance_id(self.service_name)
        publisher = InboundPublisher(settings.amqp_url, settings.fetch_publisher_threads)
        publisher.start()
        secret_box = SecretBox.from_settings(settings)
        self.context = FetcherContext(
            settings=settings,
            pool=pool,
            publisher=publisher,
            login_secrets=LoginSecrets(
                secret_box, OAuthTokens.from_settings(settings, pool, secret_box)
            ),
            leases=Leases(redis_client(settings.redis_url), worker, settings.mailbox_lease_seconds),
            worker=worker,
            connector=Connector.from_settings(settings, settings.mail_server_timeout_seconds),
        )
        super().__init__(settings, pool)

    def on_server_change(self, before: EmailServer | None, after: EmailServer | None) -> None:
        super().on_server_change(before, after)
        current = after or before
        assert current is not None
        server_id = current.id
        with self._lock:
            running = self.pollers.pop(server_id, None)
            if running is not None:
                running.stop()
                self._retiring[server_id] = running
            self._retiring = {k: p for k, p in self._retiring.items() if p.is_alive()}
            if after is not None and after.enabled and after.routing_plan_id:
                predecessor = self._retiring.pop(server_id, None)
                poller = POLLERS[after.type](after, self.context, predecessor=predecessor)
                self.pollers[server_id] = poller
                poller.start()
                log.info(
                    "fetcher: polling %s mailbox %s of server %s (version %d)",
                    after.type.value,
                    after.username,
                    after.id,
                    after.version,
                )
            elif running is not None:
                log.info("fetcher: stopped polling server %s", server_id)
        if after is None:
            try:
                self.context.publisher.forget_mailbox(server_id)
            except BrokerUnavailable:
                log.warning("fetcher: could not remove the commit-marker queue of %s", server_id)

    def on_stopped(self) -> None:
        with self._lock:
            pollers = list(self.pollers.values())
            self.pollers.clear()
        for poller in pollers:
            poller.stop()
        for poller in pollers:
            poller.join(timeout=10)
        self.context.publisher.stop()
