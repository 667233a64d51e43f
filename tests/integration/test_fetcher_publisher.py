"""The fetcher's publisher keeps its broker connections alive while no mail comes."""

from __future__ import annotations

import time
import uuid

import pika

from services.fetcher.publisher import InboundPublisher, OutgoingMail
from shared.settings import Settings
from tests.support.fetching import take


def test_an_idle_publisher_is_not_dropped_for_missed_heartbeats(settings: Settings) -> None:
    """With 2 s heartbeats the broker drops a silent client after about 4 s."""
    plan = f"heartbeat-{uuid.uuid4()}"
    queue = f"mailroom.inbound.{plan}"
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = connection.channel()
    channel.exchange_declare("mailroom.inbound", exchange_type="direct", durable=True)
    channel.queue_declare(queue, durable=True)
    channel.queue_bind(queue, "mailroom.inbound", routing_key=plan)
    connection.close()
    publisher = InboundPublisher(settings.amqp_url, threads=1, heartbeat_seconds=2)
    publisher.start()
    try:
        server_id = str(uuid.uuid4())
        mail = OutgoingMail(plan, b"Subject: one\r\n\r\n", pika.BasicProperties(delivery_mode=2))
        assert publisher.publish_batch(server_id, "batch-1", [mail]).returned == 0
        time.sleep(9)  # quiet: no mail for more than two heartbeat intervals
        assert publisher.publish_batch(server_id, "batch-2", [mail]).returned == 0
        assert publisher.committed_marker(server_id) == "batch-2"
        assert len(take(settings.amqp_url, queue, 2)) == 2
        publisher.forget_mailbox(server_id)
    finally:
        publisher.stop()
