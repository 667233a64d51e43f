"""The alerting hook: changes to failing, reauth_required or stale go to ``mailroom.status``.

Topic exchange ``mailroom.status``, routing key = the new state, JSON ``{"tenant_id",
"server_id", "state", "previous_state", "reason", "at"}`` (CONTRACT.md), persistent and
confirmed by the broker. The store appends each alert to a Redis list in the same transaction
that changes the state (an outbox); this relay empties the list. While RabbitMQ is away the
alerts wait in the list. An alert is taken off the list before it is published, so a relay
that dies in between loses that one alert (at most one per crash), never repeats one.
"""

from __future__ import annotations

import json
import logging

import redis
from kombu import Connection, Producer
from prometheus_client import Counter

from services.status.store import ALERT_OUTBOX
from shared.broker import broker_connection
from shared.topology import STATUS_EXCHANGE

log = logging.getLogger(__name__)

ALERTS_PUBLISHED = Counter(
    "mailroom_status_alerts_published_total",
    "State changes published to mailroom.status, by new state.",
    ["state"],
)


class AlertRelay:
    def __init__(self, client: redis.Redis[bytes], amqp_url: str) -> None:
        self._redis = client
        self._amqp_url = amqp_url
        self._connection: Connection | None = None
        self._producer: Producer | None = None

    def _ready_producer(self) -> Producer:
        if self._producer is None:
            self._connection = broker_connection(
                self._amqp_url,
                connect_timeout=5,
                heartbeat=0,
                transport_options={"confirm_publish": True},
            )
            self._producer = Producer(self._connection)
            STATUS_EXCHANGE(self._producer.channel).declare()
        return self._producer

    def relay(self, limit: int = 100) -> int:
        """Publish waiting alerts, oldest first; returns how many went out."""
        sent = 0
        while sent < limit:
            raw = self._redis.lpop(ALERT_OUTBOX)
            if raw is None:
                break
            alert = json.loads(raw)
            try:
                self._publish(alert)
            except Exception as exc:  # noqa: BLE001 - the alert waits for the next try
                self._redis.lpush(ALERT_OUTBOX, raw)
                log.warning("status alert not published yet (%s); it waits", exc)
                self.close()
                break
            ALERTS_PUBLISHED.labels(alert["state"]).inc()
            sent += 1
        return sent

    def _publish(self, alert: dict[str, object]) -> None:
        producer = self._ready_producer()
        producer.publish(
            json.dumps(alert),
            exchange=STATUS_EXCHANGE,
            routing_key=str(alert["state"]),
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=2,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        )
        log.info(
            "status: server %s is %s (was %s): %s",
            alert["server_id"],
            alert["state"],
            alert["previous_state"],
            alert["reason"],
        )

    def close(self) -> None:
        if self._connection is not None:
            self._connection.release()
        self._connection = self._producer = None
