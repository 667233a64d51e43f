"""The sender service: follows the SMTP servers and consumes ``mailroom.send``.

One kombu consumer (the :class:`~shared.worker.Worker` base: manual acks, reconnect,
SIGTERM) reads the config events, which keep the :class:`~shared.server_directory.
ServerDirectory` current, and the send commands, which go to the intake
(``services.sender.intake``). It wires the parts together: per-server lanes for first attempts,
dramatiq for retries, one results stream, the SMTP connections, the breakers and the rate limit.
The design and its guarantees: ``docs/design/sender.md``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from services.sender.acks import Acks
from services.sender.attempt import Attempts
from services.sender.breaker import Breakers
from services.sender.connections import SmtpConnections
from services.sender.first_attempts import FirstAttempts, Job
from services.sender.intake import Intake, parse_publishers
from services.sender.lanes import Lanes
from services.sender.outcomes import Outcomes
from services.sender.publisher import Publisher, StatusReporter
from services.sender.rate_limit import RateLimiter
from services.sender.resolver import Resolver
from services.sender.results import ResultStream
from services.sender.retries import Retries
from services.sender.strikes import Strikes
from shared.config_follower import ConfigFollower
from shared.contracts.send_limits import SendLimits
from shared.db import send_requests
from shared.db.pool import DictConnection, session_options
from shared.email_servers import EmailServer, ServerType
from shared.login_secrets import LoginSecrets
from shared.mail.connector import Connector
from shared.oauth.tokens import OAuthTokens
from shared.secrets import SecretBox
from shared.settings import Settings
from shared.topology import send_queue

log = logging.getLogger(__name__)

COMMAND_PREFETCH = 200
SETTLE_SECONDS = 0.005  # the longest an ack waits while commands are in the lanes
TICK_SECONDS = 0.25
STOP_SECONDS = 30.0


class SenderService(ConfigFollower):
    service_name = "sender"
    server_types = (ServerType.SMTP,)

    def __init__(self, settings: Settings, pool: ConnectionPool[DictConnection]) -> None:
        super().__init__(settings, pool)
        self.settings = settings
        self.db = _autocommit_pool(settings)
        self.stopping = threading.Event()
        self.publisher = Publisher(settings.amqp_url)
        self.reporter = StatusReporter(self.publisher, settings.sender_status_report_seconds)
        self.connections = SmtpConnections(
            per_server=settings.sender_connections_per_server,
            idle_seconds=settings.sender_idle_close_seconds,
            connector=Connector.from_settings(settings, settings.sender_smtp_timeout_seconds),
            slot_wait_seconds=settings.sender_slot_wait_seconds,
        )
        secret_box = SecretBox.from_settings(settings)
        self.resolver = Resolver(settings, self.directory, self.db, secret_box)
        self.retries = Retries(settings, self.db)
        self.attempts = Attempts(
            db=self.db,
            resolver=self.resolver,
            connections=self.connections,
            limiter=RateLimiter(
                settings.redis_url, settings.sender_rate_per_minute, settings.sender_rate_burst
            ),
            breakers=Breakers(),
            login_secrets=LoginSecrets(
                secret_box, OAuthTokens.from_settings(settings, self.db, secret_box)
            ),
            reporter=self.reporter,
            outcomes=Outcomes(self.publisher, self.retries),
            rate_limit_wait_seconds=settings.sender_rate_limit_wait_seconds,
            stopping=self.stopping,
        )
        acks = Acks()
        # The intake is made below: these callbacks find it when they are called.
        self.results = ResultStream(settings.amqp_url, lambda tokens: self.intake.confirmed(tokens))  # noqa: PLW0108
        self.first_attempts = FirstAttempts(
            self.db,
            self.attempts,
            Strikes(),
            settings.sender_retry_deadline_seconds,
            lambda job, ack, results: self.intake.done(job, ack, results),  # noqa: PLW0108
        )
        self.lanes: Lanes[Job] = Lanes(
            self.first_attempts.deliver,
            self.first_attempts.park,
            per_lane=settings.sender_connections_per_server,
            queue_limit=settings.sender_lane_queue_limit,
            max_threads=settings.sender_threads,
        )
        self.intake = Intake(
            limits=SendLimits.from_settings(settings),
            publishers=parse_publishers(settings.send_publishers),
            tenant_known=self.tenant_known,
            resolver=self.resolver,
            publisher=self.publisher,
            lanes=self.lanes,
            results=self.results,
            acks=acks,
        )
        self._known_tenants: set[str] = set()
        self._last_tick = 0.0

    # --- the consumer ----------------------------------------------------------------------

    def get_consumers(self, consumer_cls: Any, channel: Any) -> list[Any]:
        consumers = super().get_consumers(consumer_cls, channel)
        # on_message: the raw AMQP message, undecoded, whatever its content type says.
        consumers.append(
            consumer_cls(
                queues=[send_queue()], on_message=self.take, prefetch_count=COMMAND_PREFETCH
            )
        )
        return consumers

    def take(self, message: Any) -> None:
        try:
            self.intake.take(message)
        except Exception:
            log.exception("sender: could not take a send command; it is requeued")
            time.sleep(0.5)
            message.requeue()

    def on_connected(self) -> None:
        super().on_connected()  # resync first: commands resolve against a full directory
        self.results.start()
        self.retries.start(self.attempts)
        log.info("sender: taking send commands")

    def tick(self) -> None:
        self.intake.settle()  # every turn of the loop: acks first
        now = time.monotonic()
        if now - self._last_tick < TICK_SECONDS:
            return
        self._last_tick = now
        super().tick()
        self.connections.close_idle()
        self.reporter.flush_due()
        try:
            self.retries.sweep_due()
        except psycopg.Error as exc:
            log.warning("sender: overdue retries not checked now (%s)", exc)

    def consume(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """kombu's consumer loop, waiting for the broker only briefly while acks are due."""
        safety_interval = kwargs.pop("safety_interval", 1)
        kwargs.pop("limit", None)
        kwargs.pop("timeout", None)
        with self.consumer_context(**kwargs) as (conn, _channel, _consumers):
            while not self.should_stop:
                self.on_iteration()
                wait = SETTLE_SECONDS if self.intake.busy else safety_interval
                try:
                    conn.drain_events(timeout=wait)
                except TimeoutError:
                    conn.heartbeat_check()
                except OSError:
                    if not self.should_stop:
                        raise
                else:
                    yield

    @contextmanager
    def extra_context(self, connection: Any, channel: Any) -> Iterator[None]:
        """Around consuming on one channel: its commands end with it."""
        try:
            yield
        finally:
            if self.should_stop:
                self._drain()
            else:
                self.intake.let_go()  # the channel is gone: the broker redelivers them

    def _drain(self) -> None:
        """On a stop: commands not started go back; those in the lanes finish and are acked."""
        self.intake.let_go()
        deadline = time.monotonic() + STOP_SECONDS
        while self.intake.busy and time.monotonic() < deadline:
            time.sleep(SETTLE_SECONDS)
            self.intake.settle()

    def on_server_change(self, before: EmailServer | None, after: EmailServer | None) -> None:
        super().on_server_change(before, after)
        if before is not None:
            self.connections.forget(before.id)

    def run_until_signalled(self) -> None:
        try:
            super().run_until_signalled()
        finally:
            self.close()

    def close(self) -> None:
        self.stopping.set()
        self.lanes.stop(STOP_SECONDS)
        self.results.stop()
        self.retries.stop()
        self.connections.close()
        self.publisher.close()
        self.db.close()

    # --- tenants ---------------------------------------------------------------------------

    def tenant_known(self, tenant_id: str) -> bool:
        if tenant_id in self._known_tenants:
            return True
        known = any(s.tenant_id == tenant_id for s in self.directory.all())
        if not known:
            with self.db.connection() as conn:
                known = send_requests.tenant_known(conn, tenant_id)
        if known:
            self._known_tenants.add(tenant_id)
        return known


def _autocommit_pool(settings: Settings) -> ConnectionPool[DictConnection]:
    """Autocommit: every state change is durable when its statement returns."""
    db: ConnectionPool[DictConnection] = ConnectionPool(
        settings.database_url,
        min_size=1,
        max_size=settings.sender_threads + settings.sender_retry_threads + 4,
        connection_class=cast(type[DictConnection], psycopg.Connection),
        kwargs={
            "row_factory": dict_row,
            "autocommit": True,
            "application_name": "mailroom-sender",
            **session_options(settings.database_url),
        },
        open=False,
        name="mailroom-sender",
    )
    db.open(wait=True, timeout=10)
    return db
