"""The results of first attempts, published by one thread, many per confirm.

A command is acked only once its result is confirmed by the broker. One thread takes the first
result waiting and every one that came within ``LINGER_SECONDS`` after it (at most
``BATCH_LIMIT``), publishes them (persistent, to ``mailroom.send.results``), waits once for the
broker's confirms (``multiple`` acks) and then hands the commands back for their acks
(``on_confirmed``). After a broken connection or a nack, the unconfirmed batch is published
again on a new connection: results are at least once, as the contract says.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import amqp
from kombu import Connection

from shared.broker import broker_connection
from shared.contracts.send import SendResult
from shared.topology import SEND_RESULTS_EXCHANGE

log = logging.getLogger(__name__)

BATCH_LIMIT = 500
# How long the first result of a batch waits for more: each batch costs a publish and a wait
# for the broker's confirm; a command's ack waits this much longer.
LINGER_SECONDS = 0.02
CONFIRM_TIMEOUT_SECONDS = 10.0
RECONNECT_PAUSE_SECONDS = 1.0

Confirmed = Callable[[list[Any]], None]


class _Nacked(Exception):
    pass


class ResultStream:
    def __init__(self, amqp_url: str, on_confirmed: Confirmed) -> None:
        self._amqp_url = amqp_url
        self._on_confirmed = on_confirmed
        self._waiting: queue.SimpleQueue[tuple[SendResult, Any] | None] = queue.SimpleQueue()
        self._connection: Connection | None = None
        self._channel: Any = None
        self._published = 0  # publish sequence number on the current channel
        self._confirmed = 0  # every number up to this one is confirmed
        self._confirmed_alone: set[int] = set()  # confirmed singly, above ``_confirmed``
        self._nacked = False
        self._thread: threading.Thread | None = None
        self.stopping = threading.Event()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="mailroom-sender-results", daemon=True
            )
            self._thread.start()

    def publish(self, result: SendResult, token: Any) -> None:
        """Publish ``result``; ``token`` goes to ``on_confirmed`` once the broker has it."""
        self._waiting.put((result, token))

    def stop(self) -> None:
        """After everything submitted so far is confirmed (or the broker stays away)."""
        if self._thread is not None:
            self._waiting.put(None)
            self._thread.join(30)
            self._thread = None
        self.stopping.set()
        self._disconnect()

    # --- the publishing thread -------------------------------------------------------------

    def _run(self) -> None:
        while True:
            first = self._waiting.get()
            if first is None:
                return
            batch = [first]
            time.sleep(LINGER_SECONDS)  # while the batch fills
            while len(batch) < BATCH_LIMIT:
                try:
                    item = self._waiting.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._waiting.put(None)  # stop after this batch
                    break
                batch.append(item)
            self._deliver(batch)

    def _deliver(self, batch: list[tuple[SendResult, Any]]) -> None:
        while True:
            try:
                self._publish_confirmed([result for result, _ in batch])
                break
            except Exception as exc:  # noqa: BLE001 - any broker trouble: reconnect, again
                log.warning("sender: results not confirmed (%s); publishing them again", exc)
                self._disconnect()
                if self.stopping.wait(RECONNECT_PAUSE_SECONDS):
                    return  # not confirmed: their commands stay unacked and come again
        self._on_confirmed([token for _, token in batch])

    def _publish_confirmed(self, results: list[SendResult]) -> None:
        channel = self._open_channel()
        for result in results:
            channel.basic_publish(
                amqp.Message(
                    result.model_dump_json(),
                    content_type="application/json",
                    content_encoding="utf-8",
                    delivery_mode=2,
                    message_id=result.result_id,
                    application_headers={
                        "x-request-id": result.request_id or "",
                        "x-final": result.final,
                    },
                ),
                exchange=SEND_RESULTS_EXCHANGE.name,
                routing_key=result.routing_key,
            )
            self._published += 1
        deadline = time.monotonic() + CONFIRM_TIMEOUT_SECONDS
        assert self._connection is not None
        while self._confirmed < self._published:
            if self._nacked:
                raise _Nacked("the broker refused a result (nack)")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no confirm from the broker")
            self._connection.drain_events(timeout=remaining)
        if self._nacked:
            raise _Nacked("the broker refused a result (nack)")

    def _open_channel(self) -> Any:
        if self._channel is not None:
            return self._channel
        connection = broker_connection(self._amqp_url, connect_timeout=5, heartbeat=0)
        connection.connect()
        channel = connection.channel()
        SEND_RESULTS_EXCHANGE(channel).declare()
        channel.confirm_select()
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)
        self._connection, self._channel = connection, channel
        self._published = self._confirmed = 0
        self._confirmed_alone = set()
        self._nacked = False
        return channel

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        if multiple:
            self._confirmed = max(self._confirmed, delivery_tag)
        else:
            self._confirmed_alone.add(delivery_tag)
        while self._confirmed + 1 in self._confirmed_alone:
            self._confirmed += 1
        self._confirmed_alone = {tag for tag in self._confirmed_alone if tag > self._confirmed}

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._nacked = True

    def _disconnect(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            try:
                connection.release()
            except Exception as exc:  # noqa: BLE001 - it is being thrown away
                log.debug("sender: closing the results connection: %s", exc)
