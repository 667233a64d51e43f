"""Every exchange and queue of the contract exists once the service that owns it has started:
a client may bind to ``mailroom.send.results`` or ``mailroom.status`` before the first message.

Each service starts as a real process on a vhost of its own that holds nothing yet.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator

import pika
import pytest

from shared.topology import owned_by
from tests.lab.dovecot import free_port
from tests.support.environment import TEST_AMQP_URL
from tests.support.processes import ServiceProcess

READY = {
    "config-api": "outbox relay: declared the config API's exchanges",
    "fetcher": "fetcher: connected to RabbitMQ, consuming",
    "sender": "sender: connected to RabbitMQ, consuming",
    "status": "status: connected to RabbitMQ, consuming",
}


@pytest.fixture
def fresh_vhost() -> Iterator[str]:
    name = f"mailroom_fresh_{uuid.uuid4().hex[:8]}"
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", name], check=True)
    subprocess.run(
        ["rabbitmqctl", "-q", "set_permissions", "-p", name, "guest", ".*", ".*", ".*"], check=True
    )
    yield TEST_AMQP_URL.rsplit("/", 1)[0] + "/" + name
    subprocess.run(["rabbitmqctl", "-q", "delete_vhost", name], check=True)


@pytest.mark.parametrize("service", list(READY))
def test_a_client_binds_to_what_a_service_owns_right_after_its_start(
    fresh_vhost: str, service: str
) -> None:
    """E.g. a client binds to ``mailroom.send.results`` right after the sender started."""
    process = ServiceProcess(
        "run",
        service,
        env={
            "MAILROOM_AMQP_URL": fresh_vhost,
            "MAILROOM_API_PORT": str(free_port()),
            "MAILROOM_STATUS_PORT": str(free_port()),
            "MAILROOM_FETCHER_METRICS_PORT": "0",
            "MAILROOM_SENDER_METRICS_PORT": "0",
        },
    )
    try:
        process.wait_for_log(READY[service], timeout=30)
        connection = pika.BlockingConnection(pika.URLParameters(fresh_vhost))
        try:
            channel = connection.channel()
            for entity in owned_by(service):
                if hasattr(entity, "type"):  # an exchange: a client binds its own queue to it
                    mine = channel.queue_declare("", exclusive=True).method.queue
                    channel.queue_bind(mine, entity.name, routing_key="#")
                else:
                    channel.queue_declare(entity.name, passive=True)
        finally:
            connection.close()
    finally:
        process.terminate()
    assert owned_by(service), f"{service} owns nothing"
