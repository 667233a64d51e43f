"""Hands fetched mail to RabbitMQ in transactions that carry their own commit marker.

Each batch of a mailbox is published in one AMQP transaction: the mails (to the routing plan's
queue, ``mandatory``) plus a marker naming the batch, to the mailbox's own marker queue
(``mailroom.fetcher.commits.<server_id>``, which holds only the newest marker). The broker
routes all of it or none of it. After a crash, the marker tells whether the batch the database
still shows as pending reached the broker — the one question that publisher confirms alone
cannot answer — so a mail is neither lost nor handed over twice (``handover.py``).

pika's BlockingConnection is not thread-safe: a few publisher threads, each with its own
connection, serve the pollers through a queue of requests.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import AMQPError, ChannelClosedByBroker

from shared.contracts.status_reports import StatusReport
from shared.topology import (
    INBOUND_EXCHANGE,
    INBOUND_QUARANTINE_QUEUE_NAME,
    STATUS_REPORTS_QUEUE_NAME,
    inbound_queue,
)

log = logging.getLogger(__name__)

MARKER_QUEUE_PREFIX = "mailroom.fetcher.commits."


def marker_queue(server_id: str) -> str:
    return f"{MARKER_QUEUE_PREFIX}{server_id}"


class BrokerUnavailable(Exception):
    """RabbitMQ could not be reached or failed mid-way; what was sent is uncertain."""


@dataclass(frozen=True)
class OutgoingMail:
    routing_key: str  # the routing plan id (exchange mailroom.inbound)
    body: bytes
    properties: pika.BasicProperties
    quarantine: bool = False  # to the quarantine queue instead


@dataclass(frozen=True)
class BatchOutcome:
    returned: int  # mails the broker could not route (queue missing)


@dataclass
class _Channels:
    """One publisher thread's channels: ``tx`` in transaction mode, ``plain`` for the rest."""

    tx: BlockingChannel
    plain: BlockingChannel
    returned: list[str] = field(default_factory=list)  # routing keys the broker sent back


@dataclass
class _Request:
    run: Callable[[_Channels], Any]
    result: Future[Any] = field(default_factory=Future)


class InboundPublisher:
    def __init__(self, amqp_url: str, threads: int = 2, heartbeat_seconds: int = 30) -> None:
        self._amqp_url = amqp_url
        self._heartbeat = heartbeat_seconds
        self._requests: queue.Queue[_Request | None] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._serve, name=f"publisher-{n}", daemon=True)
            for n in range(threads)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        for _ in self._threads:
            self._requests.put(None)
        for thread in self._threads:
            thread.join(5)

    # --- what pollers ask for --------------------------------------------------------------

    def publish_batch(
        self, server_id: str, batch_id: str, mails: list[OutgoingMail], timeout: float = 60.0
    ) -> BatchOutcome:
        """Publish ``mails`` and the batch's marker in one transaction; raise when uncertain."""
        return self.outcome(self.start_batch(server_id, batch_id, mails), timeout)

    def start_batch(
        self, server_id: str, batch_id: str, mails: list[OutgoingMail]
    ) -> Future[BatchOutcome]:
        """Like :meth:`publish_batch`, without waiting: the caller reads the next mails
        meanwhile, and must collect the outcome with :meth:`outcome` before anything else."""

        def run(channels: _Channels) -> BatchOutcome:
            tx = channels.tx
            channels.returned.clear()
            plans = {mail.routing_key for mail in mails if not mail.quarantine}
            if any(not self._queue_exists(channels, inbound_queue(plan).name) for plan in plans):
                return BatchOutcome(returned=len(mails))  # publish nothing: see module doc
            tx.queue_declare(marker_queue(server_id), durable=True, arguments=_MARKER_ARGS)
            # BlockingChannel.basic_publish runs the I/O loop after every message; in a
            # transaction nothing is decided before the commit, so the frames are queued on
            # the channel underneath and Tx.Commit sends them all.
            channel = tx._impl
            for mail in mails:
                exchange, key = (
                    ("", INBOUND_QUARANTINE_QUEUE_NAME)
                    if mail.quarantine
                    else (INBOUND_EXCHANGE.name, mail.routing_key)
                )
                channel.basic_publish(exchange, key, mail.body, mail.properties, mandatory=True)
            channel.basic_publish("", marker_queue(server_id), batch_id.encode(), _PERSISTENT)
            tx.tx_commit()
            # Returns arrive before Commit-Ok; pika hands them to the callback only here.
            tx.connection.process_data_events(time_limit=0)
            if channels.returned:
                # The marker went through although the mails did not: void it at once, so that
                # a crash now cannot make recovery count the returned mails as handed over.
                tx.basic_publish(
                    "", marker_queue(server_id), b"void:" + batch_id.encode(), _PERSISTENT
                )
                tx.tx_commit()
            return BatchOutcome(returned=len(channels.returned))

        request = _Request(run)
        self._requests.put(request)
        return request.result

    def outcome(self, pending: Future[BatchOutcome], timeout: float = 60.0) -> BatchOutcome:
        result: BatchOutcome = self._await(pending, timeout)
        return result

    @staticmethod
    def _queue_exists(channels: _Channels, name: str) -> bool:
        """Checked before a batch: a batch whose mails the broker would return must not
        commit its marker, or a crash right after could count the mails as handed over."""
        try:
            channels.plain.queue_declare(name, passive=True)
        except ChannelClosedByBroker:
            channels.plain = channels.tx.connection.channel()
            return False
        return True

    def committed_marker(self, server_id: str, timeout: float = 30.0) -> str | None:
        """The id of the mailbox's last committed batch, or None (the marker stays)."""

        def run(channels: _Channels) -> str | None:
            plain = channels.plain
            plain.queue_declare(marker_queue(server_id), durable=True, arguments=_MARKER_ARGS)
            method, _, body = plain.basic_get(marker_queue(server_id), auto_ack=False)
            if method is None:
                return None
            plain.basic_nack(method.delivery_tag, requeue=True)
            return bytes(body).decode()

        marker: str | None = self._submit(run, timeout)
        return marker

    def forget_mailbox(self, server_id: str, timeout: float = 30.0) -> None:
        """A deleted server's marker queue goes with it."""
        self._submit(lambda channels: channels.plain.queue_delete(marker_queue(server_id)), timeout)

    def report(self, report: StatusReport) -> None:
        """Fire and forget: a lost status report is replaced by the next one."""

        def run(channels: _Channels) -> None:
            channels.plain.basic_publish(
                "",
                STATUS_REPORTS_QUEUE_NAME,
                report.model_dump_json().encode(),
                pika.BasicProperties(content_type="application/json", delivery_mode=1),
            )

        self._requests.put(_Request(run))

    def _submit(self, run: Callable[[_Channels], Any], timeout: float) -> Any:
        """Run ``run`` on a publishing thread and wait for its outcome (see :meth:`_await`)."""
        request = _Request(run)
        self._requests.put(request)
        return self._await(request.result, timeout)

    @staticmethod
    def _await(result: Future[Any], timeout: float) -> Any:
        """A request still waiting when the time is up is withdrawn; one already running is
        waited for to the end. Abandoning a running batch would let it commit after the
        mailbox's next session had decided, from the marker, that it never reached RabbitMQ."""
        try:
            return result.result(timeout=timeout)
        except FutureTimeout:
            if result.cancel():
                raise BrokerUnavailable(f"no publishing thread free within {timeout:g} s") from None
            return result.result()

    # --- the publishing threads -------------------------------------------------------------

    def _serve(self) -> None:
        connection: pika.BlockingConnection | None = None
        channels: _Channels | None = None
        while True:
            try:
                request = self._requests.get(timeout=_HEARTBEAT_SERVICE_SECONDS)
            except queue.Empty:
                # A BlockingConnection answers heartbeats only when called: an idle publisher
                # would otherwise be dropped by the broker after two missed heartbeats.
                if connection is not None and connection.is_open:
                    try:
                        connection.process_data_events(time_limit=0)
                    except (AMQPError, OSError):
                        connection, channels = None, None
                continue
            if request is None:
                break
            if not request.result.set_running_or_notify_cancel():
                continue  # withdrawn by the poller that asked
            try:
                if connection is None or not connection.is_open or channels is None:
                    connection, channels = self._connect()
                request.result.set_result(request.run(channels))
            except (AMQPError, OSError) as exc:
                channels = None
                if connection is not None and connection.is_open:
                    try:
                        connection.close()
                    except (AMQPError, OSError):
                        log.debug("closing a broken broker connection failed", exc_info=True)
                connection = None
                request.result.set_exception(BrokerUnavailable(f"RabbitMQ: {exc!r}"))
            except Exception as exc:  # noqa: BLE001 - handed to the poller that asked
                # Whatever was published on the transaction channel must not be committed by
                # the next request: dropping the connection discards it.
                if connection is not None and connection.is_open:
                    try:
                        connection.close()
                    except (AMQPError, OSError):
                        log.debug("closing the broker connection failed", exc_info=True)
                connection, channels = None, None
                request.result.set_exception(exc)
        if connection is not None and connection.is_open:
            connection.close()

    def _connect(self) -> tuple[pika.BlockingConnection, _Channels]:
        parameters = pika.URLParameters(self._amqp_url)
        parameters.heartbeat = self._heartbeat
        parameters.blocked_connection_timeout = 60
        connection = pika.BlockingConnection(parameters)
        tx = connection.channel()
        tx.exchange_declare(INBOUND_EXCHANGE.name, exchange_type="direct", durable=True)
        tx.queue_declare(INBOUND_QUARANTINE_QUEUE_NAME, durable=True)
        tx.queue_declare(STATUS_REPORTS_QUEUE_NAME, durable=True)
        tx.tx_select()
        channels = _Channels(tx, connection.channel())
        tx.add_on_return_callback(
            lambda _ch, method, _p, _b: channels.returned.append(method.routing_key)
        )
        return connection, channels


_HEARTBEAT_SERVICE_SECONDS = 1.0
_MARKER_ARGS = {"x-max-length": 1, "x-overflow": "drop-head"}
_PERSISTENT = pika.BasicProperties(delivery_mode=2)
