"""The plumbing every consuming service shares, so each worker holds only its own logic.

A :class:`Worker` connects to RabbitMQ, declares its queues (from ``shared.topology``),
consumes with manual acks, reconnects after a broker restart or a dropped connection without a
process restart, and stops gracefully on SIGTERM/SIGINT: the message in hand is finished and
acked before the connection closes.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from kombu import Message, Queue
from kombu.mixins import ConsumerMixin

from shared.broker import broker_connection
from shared.logging_setup import Throttled
from shared.metrics import TICK_FAILURES
from shared.topology import declare_owned

log = logging.getLogger(__name__)


class _StopWhileDisconnected(Exception):
    """Raised from the reconnect loop when a stop was asked for while the broker is away."""


class PermanentMessageError(Exception):
    """The message can never be handled (malformed, invalid): reject it, never retry."""


@dataclass(frozen=True)
class Subscription:
    queue: Queue
    handle: Callable[[Any, Message], None]
    prefetch: int = 50


class Worker(ConsumerMixin):  # type: ignore[misc]
    """Base class: subclasses name their subscriptions and, optionally, periodic work."""

    service_name = "worker"

    def __init__(self, amqp_url: str) -> None:
        self.connection = broker_connection(amqp_url, heartbeat=30, connect_timeout=5)
        self.connected = threading.Event()
        self.connections_made = 0  # 1 after the first connect; more after every reconnect
        self.should_stop = False
        self._thread: threading.Thread | None = None
        self._tick_failure_log = Throttled(log)
        # When the periodic work began to fail, every tick since (None: it works): for health.
        self.ticks_failing_since: float | None = None

    # --- what subclasses provide -----------------------------------------------------------

    def subscriptions(self) -> list[Subscription]:
        raise NotImplementedError

    def on_connected(self) -> None:
        """Called after every (re)connect: the place to heal what was missed meanwhile."""

    def tick(self) -> None:
        """Called about once a second from the consuming thread."""

    def on_handler_error(self, subscription: Subscription) -> None:
        """A handler raised something unexpected; its message was rejected."""

    # --- kombu hooks -----------------------------------------------------------------------

    def get_consumers(self, consumer_cls: Any, channel: Any) -> list[Any]:
        consumers = []
        for subscription in self.subscriptions():
            consumer = consumer_cls(
                queues=[subscription.queue],
                callbacks=[self._dispatcher(subscription)],
                accept=["json"],
                prefetch_count=subscription.prefetch,
            )
            consumers.append(consumer)
        return consumers

    def on_consume_ready(
        self, connection: Any, channel: Any, consumers: Any, **kwargs: Any
    ) -> None:
        declare_owned(self.service_name, channel)
        log.info("%s: connected to RabbitMQ, consuming", self.service_name)
        self.on_connected()
        self.connections_made += 1
        self.connected.set()

    def on_connection_error(self, exc: Exception, interval: float) -> None:
        self.connected.clear()
        if self.should_stop:
            # kombu retries connecting forever; a stop must not wait for the broker to return.
            raise _StopWhileDisconnected
        log.warning(
            "%s: RabbitMQ unavailable (%s); retrying in %.0f s", self.service_name, exc, interval
        )

    def on_iteration(self) -> None:
        # An error escaping here ends the consuming thread for good unless it is one of the
        # broker's (kombu reconnects after those, as it always did): any other is logged, at
        # most once a minute, and the next tick tries again.
        try:
            self.tick()
        except self.connection.connection_errors + self.connection.channel_errors:
            raise
        except Exception:  # noqa: BLE001 - logged (throttled) and counted
            TICK_FAILURES.labels(self.service_name).inc()
            if self.ticks_failing_since is None:
                self.ticks_failing_since = time.monotonic()
            self._tick_failure_log.exception(
                "%s: periodic work failed; tried again next tick", self.service_name
            )
        else:
            self.ticks_failing_since = None

    def _dispatcher(self, subscription: Subscription) -> Callable[[Any, Message], None]:
        def dispatch(body: Any, message: Message) -> None:
            try:
                subscription.handle(body, message)
            except PermanentMessageError as exc:
                log.error(
                    "%s: rejected a message from %s: %s",
                    self.service_name,
                    subscription.queue.name,
                    exc,
                )
                message.reject(requeue=False)
                return
            except Exception:
                # A bug or an outage the handler did not classify. Requeueing would redeliver it
                # at once, forever; it is rejected (to the queue's dead-letter exchange, where it
                # has one) and the worker is told, so it can heal (config followers resync).
                log.exception("%s: failed to handle a message; it is rejected", self.service_name)
                message.reject(requeue=False)
                self.on_handler_error(subscription)
                return
            if not message.acknowledged:
                message.ack()

        return dispatch

    # --- running ---------------------------------------------------------------------------

    def stop(self) -> None:
        self.should_stop = True

    def run_until_signalled(self) -> None:
        """Run in the foreground until SIGTERM or SIGINT (the container's and Ctrl-C's way)."""

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("%s: %s received, stopping", self.service_name, signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.run_until_stopped()
        self.connection.release()
        log.info("%s: stopped", self.service_name)

    def run_until_stopped(self) -> None:
        try:
            self.run()
        except _StopWhileDisconnected:
            log.info("%s: stopped while RabbitMQ was unavailable", self.service_name)
        finally:
            self.on_stopped()

    def on_stopped(self) -> None:
        """Called once consuming has ended: release what the worker started."""

    def start_in_thread(self) -> threading.Thread:
        thread = threading.Thread(
            target=self.run_until_stopped, name=self.service_name, daemon=True
        )
        thread.start()
        self._thread = thread
        return thread

    @property
    def consuming(self) -> bool:
        """Connected, and (when run in a thread) that thread is still alive."""
        return self.connected.is_set() and (self._thread is None or self._thread.is_alive())
