"""Publishes the outbox's events to RabbitMQ, in order, each confirmed by the broker.

Runs as a thread of the config API. PostgreSQL wakes it with ``NOTIFY`` on every commit that
wrote an event, so an API write reaches the workers in milliseconds; a timed poll covers a
missed notification. Only one relay publishes at a time (a PostgreSQL advisory lock), which
keeps events in commit order when several config API replicas run. While RabbitMQ is down the
events wait in the table and go out, in order, once it answers again.

Delivery is at least once: a crash between the broker's confirm and the ``published_at``
update sends that event again. Consumers therefore treat events as "re-read this server",
which is idempotent.
"""

from __future__ import annotations

import logging
import threading
import time

import psycopg
from amqp.exceptions import AMQPError, MessageNacked
from kombu import Connection, Producer
from kombu.exceptions import KombuError
from prometheus_client import Counter, Gauge, Histogram
from psycopg.rows import dict_row

from shared.broker import broker_connection
from shared.db import outbox
from shared.db.pool import DictConnection, session_options
from shared.topology import CONFIG_EXCHANGE, ROUTING_PLAN_CREATED, declare_owned, inbound_queue

log = logging.getLogger(__name__)

EVENTS_PUBLISHED = Counter(
    "mailroom_config_events_published_total", "Config events confirmed by RabbitMQ."
)
PUBLISH_DELAY = Histogram(
    "mailroom_config_event_delay_seconds",
    "From the change's commit to the broker's confirm of its event (outbox lag).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
OLDEST_WAITING = Gauge(
    "mailroom_outbox_oldest_waiting_seconds",
    "Age of the oldest config event not yet confirmed by RabbitMQ (0 when none waits).",
)
RELAY_LOCK_KEY = 0x6D61696C726F6F6D  # "mailroom": one advisory lock for all relays
BROKER_ERRORS = (OSError, KombuError, AMQPError, MessageNacked)
CONFIRM_TIMEOUT_SECONDS = 10.0
_PURGE_EVERY_SECONDS = 3600.0


class OutboxRelay:
    def __init__(self, database_url: str, amqp_url: str, poll_seconds: float = 1.0) -> None:
        self._database_url = database_url
        self._amqp_url = amqp_url
        self._poll_seconds = poll_seconds
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._broker: Connection | None = None
        self._producer: Producer | None = None
        self._broker_down_since: float | None = None
        self._last_purge = 0.0

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="outbox-relay", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._close_broker()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        backoff = 0.5
        while not self._stopping.is_set():
            try:
                self._serve()
                backoff = 0.5
            except psycopg.Error as exc:
                log.warning("outbox relay: database unavailable (%s); retrying", exc)
            except Exception:
                # Whatever it was, the relay must outlive it: events would silently stop.
                log.exception("outbox relay: unexpected failure; restarting")
                self._close_broker()
            self._stopping.wait(backoff)
            backoff = min(backoff * 2, 5.0)

    # --- the loop --------------------------------------------------------------------------

    def _serve(self) -> None:
        with psycopg.connect(
            self._database_url,
            autocommit=True,
            row_factory=dict_row,
            **session_options(self._database_url),
        ) as conn:
            conn.execute(f"LISTEN {outbox.NOTIFY_CHANNEL}")
            self._declare_topology()
            if not self._become_leader(conn):
                return
            log.info("outbox relay: publishing config events")
            while not self._stopping.is_set():
                if self.publish_pending(conn) == 0:
                    self._purge_now_and_then(conn)
                    for _ in conn.notifies(timeout=self._poll_seconds, stop_after=1):
                        pass

    def _become_leader(self, conn: DictConnection) -> bool:
        while not self._stopping.is_set():
            row = conn.execute(
                "SELECT pg_try_advisory_lock(%s) AS got", (RELAY_LOCK_KEY,)
            ).fetchone()
            if row is not None and row["got"]:
                return True
            self._stopping.wait(self._poll_seconds)
        return False

    def publish_pending(self, conn: DictConnection) -> int:
        """Publish what waits, oldest first; returns how many went out."""
        entries = outbox.pending(conn)
        if not entries:
            OLDEST_WAITING.set(0)
            return 0
        done: list[int] = []
        try:
            producer = self._ensure_producer()
            for entry in entries:
                if entry.routing_key == ROUTING_PLAN_CREATED:
                    inbound_queue(entry.body["routing_plan_id"])(producer.channel).declare()
                producer.publish(
                    entry.body,
                    exchange=CONFIG_EXCHANGE,
                    routing_key=entry.routing_key,
                    serializer="json",
                    delivery_mode=2,
                    message_id=entry.body.get("event_id"),
                    retry=False,
                    confirm_timeout=CONFIRM_TIMEOUT_SECONDS,
                )
                done.append(entry.id)
                EVENTS_PUBLISHED.inc()
                PUBLISH_DELAY.observe(time.time() - entry.created_at.timestamp())
        except BROKER_ERRORS as exc:
            oldest = entries[len(done)].created_at.timestamp()
            OLDEST_WAITING.set(max(0.0, time.time() - oldest))
            self._broker_failed(exc, len(entries) - len(done))
        finally:
            if done:
                outbox.mark_published(conn, done)
        if done and self._broker_down_since is not None:
            log.info(
                "outbox relay: RabbitMQ answers again after %.1f s",
                time.monotonic() - self._broker_down_since,
            )
            self._broker_down_since = None
        return len(done)

    # --- broker connection -----------------------------------------------------------------

    def _ensure_producer(self) -> Producer:
        if self._producer is None:
            broker = broker_connection(
                self._amqp_url, connect_timeout=5, transport_options={"confirm_publish": True}
            )
            broker.connect()
            self._broker = broker
            self._producer = Producer(broker.channel(), exchange=CONFIG_EXCHANGE)
            declare_owned("config-api", self._producer.channel)
        return self._producer

    def _declare_topology(self) -> None:
        """What the config API owns exists from its start, not from its first event, whether
        or not this replica leads (the leader declares again on every connect)."""
        try:
            with broker_connection(self._amqp_url, connect_timeout=5) as broker:
                declare_owned("config-api", broker.default_channel)
        except BROKER_ERRORS as exc:
            log.warning("outbox relay: RabbitMQ unavailable (%s); declared once it is back", exc)
            return
        log.info("outbox relay: declared the config API's exchanges")

    def _broker_failed(self, exc: Exception, waiting: int) -> None:
        self._close_broker()
        if self._broker_down_since is None:
            # Often just a connection the broker closed while idle: reconnect at once.
            self._broker_down_since = time.monotonic()
            log.warning("outbox relay: RabbitMQ unavailable (%s); %d events wait", exc, waiting)
            return
        down_for = time.monotonic() - self._broker_down_since
        self._stopping.wait(min(5.0, 0.5 + down_for / 10))

    def _close_broker(self) -> None:
        if self._broker is not None:
            try:
                self._broker.release()
            except BROKER_ERRORS:
                log.debug("outbox relay: error while closing the broker connection", exc_info=True)
        self._broker = None
        self._producer = None

    def _purge_now_and_then(self, conn: DictConnection) -> None:
        now = time.monotonic()
        if now - self._last_purge >= _PURGE_EVERY_SECONDS:
            self._last_purge = now
            purged = outbox.purge_published(conn)
            if purged:
                log.info("outbox relay: removed %d published events older than a day", purged)
