"""The project's RabbitMQ connections (shared.broker) against the real broker."""

from __future__ import annotations

import pytest

from shared import broker
from shared.settings import Settings


def test_a_connection_reaches_the_broker(settings: Settings) -> None:
    with broker.broker_connection(settings.amqp_url, connect_timeout=5) as conn:
        conn.connect()
        assert conn.connected


def test_a_url_of_another_broker_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="MAILROOM_AMQP_URL must be amqp:// or amqps://"):
        broker.broker_connection("redis://127.0.0.1:6379/0")
