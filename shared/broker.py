"""Connections to RabbitMQ: kombu over py-amqp, made in one place."""

from __future__ import annotations

from typing import Any

from kombu import Connection


def broker_connection(amqp_url: str, **options: Any) -> Connection:
    """A kombu connection to ``amqp_url`` (not connected yet); ``options`` as kombu takes them."""
    scheme = amqp_url.partition("://")[0].lower()
    if scheme not in ("amqp", "amqps", "pyamqp"):
        raise ValueError(f"MAILROOM_AMQP_URL must be amqp:// or amqps://, not {scheme}://")
    return Connection(amqp_url, **options)
