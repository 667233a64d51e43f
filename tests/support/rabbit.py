"""RabbitMQ helpers for tests: the test vhost, and a tap that sees every config event."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pika

from tests.support.environment import TEST_VHOST


def ensure_vhost() -> None:
    """The suite's own vhost; created with rabbitmqctl (the management plugin is not enabled)."""
    existing = subprocess.run(
        ["rabbitmqctl", "-q", "list_vhosts"], capture_output=True, text=True, check=True
    ).stdout.split()
    if TEST_VHOST not in existing:
        subprocess.run(["rabbitmqctl", "-q", "add_vhost", TEST_VHOST], check=True)
    subprocess.run(
        ["rabbitmqctl", "-q", "set_permissions", "-p", TEST_VHOST, "guest", ".*", ".*", ".*"],
        check=True,
    )


def close_all_connections() -> None:
    """What a broker restart looks like to a client: every connection of the vhost dropped."""
    subprocess.run(
        ["rabbitmqctl", "-q", "close_all_connections", "--vhost", TEST_VHOST, "test: broker drop"],
        check=True,
    )


def connect(amqp_url: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(amqp_url))


@dataclass
class Received:
    routing_key: str
    body: dict[str, Any]
    raw: bytes
    properties: Any
    at: float


@dataclass
class EventTap:
    """Collects every message published to an exchange, from a thread of its own."""

    amqp_url: str
    exchange: str
    binding: str = "#"
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> EventTap:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("event tap did not connect to RabbitMQ")
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        # Reconnects when a test drops every connection of the vhost (a broker "restart").
        while not self._stop.is_set():
            try:
                self._consume()
            except pika.exceptions.AMQPError:
                time.sleep(0.05)

    def _consume(self) -> None:
        conn = connect(self.amqp_url)
        try:
            channel = conn.channel()
            channel.exchange_declare(self.exchange, exchange_type="topic", durable=True)
            queue = channel.queue_declare("", exclusive=True).method.queue
            channel.queue_bind(queue, self.exchange, routing_key=self.binding)
            self._ready.set()
            while not self._stop.is_set():
                method, properties, body = channel.basic_get(queue, auto_ack=True)
                if method is None:
                    conn.sleep(0.005)
                    continue
                try:
                    decoded = json.loads(body)
                except ValueError:
                    decoded = {}  # not an event of ours (a benchmark's probe); still recorded
                with self._lock:
                    self.received.append(
                        Received(method.routing_key, decoded, body, properties, time.monotonic())
                    )
        finally:
            if conn.is_open:
                conn.close()

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def wait_for(
        self, predicate: Callable[[Received], bool], timeout: float = 2.0, count: int = 1
    ) -> list[Received]:
        deadline = time.monotonic() + timeout
        while True:
            matching = [r for r in self.snapshot() if predicate(r)]
            if len(matching) >= count or time.monotonic() > deadline:
                return matching
            time.sleep(0.01)
