"""The project's RabbitMQ connections (shared.broker) against the real broker."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import amqp
import pytest
from amqp import transport as amqp_transport
from kombu import Consumer, Message, Queue

from shared import broker
from shared.settings import Settings


@pytest.fixture
def queue_name(settings: Settings) -> Iterator[str]:
    name = f"mailroom.test.read-ahead.{uuid.uuid4().hex[:8]}"
    yield name
    with broker.broker_connection(settings.amqp_url) as conn:
        conn.channel().queue_delete(name)


def _publish(settings: Settings, queue: str, bodies: list[bytes]) -> None:
    with broker.broker_connection(settings.amqp_url) as conn:
        channel = conn.channel()
        channel.queue_declare(queue, durable=False, auto_delete=False)
        for body in bodies:
            channel.basic_publish(amqp.Message(body), exchange="", routing_key=queue)


def _consume(
    settings: Settings, queue: str, count: int, prefetch: int, reads: list[int] | None = None
) -> list[bytes]:
    got: list[Message] = []
    with broker.broker_connection(settings.amqp_url, heartbeat=0) as conn:
        conn.connect()
        transport = conn.connection.transport
        recv = transport._quick_recv

        def counted(size: int) -> bytes:
            if reads is not None:
                reads.append(size)
            return recv(size)  # type: ignore[no-any-return]

        transport._quick_recv = counted
        channel = conn.channel()
        channel.basic_qos(0, prefetch, False)
        consumer = Consumer(channel, [Queue(queue, no_declare=True)], on_message=got.append)
        consumer.consume()
        for _ in range(10 * count):
            if len(got) >= count:
                break
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.5)
            if got:
                got[-1].ack()
        with pytest.raises(TimeoutError):  # nothing more; a timeout leaves the buffer usable
            conn.drain_events(timeout=0.05)
    return [bytes(message.body) for message in got]


def test_consumed_messages_arrive_whole_and_in_order_across_reads(
    settings: Settings, queue_name: str
) -> None:
    # Sizes around and far above one read ahead, so frames end inside a read and span many.
    sizes = [1, 7, 8, 100, broker.READ_AHEAD_BYTES - 8, broker.READ_AHEAD_BYTES + 1, 200_000]
    bodies = [bytes([n % 251]) * sizes[n % len(sizes)] for n in range(240)]
    _publish(settings, queue_name, bodies)
    assert _consume(settings, queue_name, len(bodies), prefetch=100) == bodies


def test_small_messages_are_read_many_frames_at_a_time(settings: Settings, queue_name: str) -> None:
    bodies = [f"message {n}".encode() for n in range(300)]
    _publish(settings, queue_name, bodies)
    reads: list[int] = []
    assert _consume(settings, queue_name, len(bodies), prefetch=300, reads=reads) == bodies
    # py-amqp alone reads three times per frame, three frames per message: 2,700 reads.
    assert len(reads) < len(bodies)


def test_a_publishing_connection_asks_for_no_blocked_notices(settings: Settings) -> None:
    with broker.broker_connection(settings.amqp_url, blocked_notices=False) as conn:
        conn.connect()
        capabilities = conn.connection.client_properties["capabilities"]
    assert capabilities["connection.blocked"] is False
    assert capabilities["consumer_cancel_notify"] is True
    with broker.broker_connection(settings.amqp_url) as conn:
        conn.connect()
        assert conn.connection.client_properties["capabilities"]["connection.blocked"] is True


@pytest.mark.parametrize("blocked_notices", [True, False])
def test_amqps_urls_keep_tls_and_plain_ones_read_ahead(blocked_notices: bool) -> None:
    for url, expected in (
        ("amqps://guest:guest@127.0.0.1:5671/x", amqp_transport.SSLTransport),
        ("amqp://guest:guest@127.0.0.1:5672/x", broker._ReadAheadTCPTransport),
    ):
        conn = broker.broker_connection(url, blocked_notices=blocked_notices)
        client = conn.transport.Connection(host="127.0.0.1")  # py-amqp's, not connected
        made = client.Transport("127.0.0.1", 5, ssl=conn.ssl)
        assert type(made) is expected, url


def test_a_url_of_another_broker_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="MAILROOM_AMQP_URL must be amqp:// or amqps://"):
        broker.broker_connection("redis://127.0.0.1:6379/0")
