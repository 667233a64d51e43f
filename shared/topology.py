"""Every RabbitMQ exchange and queue Mailroom uses, declared in this one place.

The names of exchanges and the inbound/send queues are part of the external contract
(CONTRACT.md): add, never rename. Per-instance queues (a worker's own copy of the config
events) are Mailroom's internal business.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from kombu import Exchange, Queue

CONFIG_EXCHANGE = Exchange("mailroom.config", type="topic", durable=True)
INBOUND_EXCHANGE = Exchange("mailroom.inbound", type="direct", durable=True)
STATUS_EXCHANGE = Exchange("mailroom.status", type="topic", durable=True)
SEND_RESULTS_EXCHANGE = Exchange("mailroom.send.results", type="topic", durable=True)

SEND_QUEUE_NAME = "mailroom.send"  # CONTRACT: default exchange, routing key = queue name
SEND_DEAD_LETTER_QUEUE_NAME = "mailroom.send.dead"  # invalid or finally failed commands
INBOUND_QUARANTINE_QUEUE_NAME = "mailroom.inbound.quarantine"  # mail that cannot be delivered
STATUS_REPORTS_QUEUE_NAME = "mailroom.status.reports"  # workers -> status service (internal)
ROUTING_PLAN_CREATED = "routing_plan.created"

EMAIL_SERVER_EVENTS = "email_server.#"


def inbound_queue(routing_plan_id: str) -> Queue:
    """The durable queue that receives a routing plan's mail (CONTRACT)."""
    return Queue(
        f"mailroom.inbound.{routing_plan_id}",
        exchange=INBOUND_EXCHANGE,
        routing_key=routing_plan_id,
        durable=True,
    )


def instance_id(service: str) -> str:
    """A name unique to this process, for queues that belong to one running instance."""
    return f"{service}.{socket.gethostname()}.{os.getpid()}"


def config_events_queue(service: str) -> Queue:
    """This process's own copy of the config events.

    Every instance of a service needs every event (each keeps its own view of the servers), so
    each gets its own queue. It lives as long as the connection; what is missed while
    disconnected is healed by the full resync that follows every (re)connect.
    """
    return Queue(
        f"mailroom.config.{instance_id(service)}",
        exchange=CONFIG_EXCHANGE,
        routing_key=EMAIL_SERVER_EVENTS,
        durable=False,
        auto_delete=True,
        exclusive=True,
    )


def status_reports_queue() -> Queue:
    """Every worker's reports, consumed by the status service (any of its replicas)."""
    return Queue(STATUS_REPORTS_QUEUE_NAME, durable=True)


# --- sender (issue 4) ----------------------------------------------------------------------
# dramatiq's own queue for deliveries (plus its ``.DQ`` delay and ``.XQ`` dead-letter queues,
# which dramatiq declares): internal, not part of the contract.
SENDER_DELIVERY_QUEUE_NAME = "mailroom.sender.deliver"


def send_queue() -> Queue:
    """The public command queue (CONTRACT): default exchange, routing key ``mailroom.send``."""
    return Queue(SEND_QUEUE_NAME, routing_key=SEND_QUEUE_NAME, durable=True)


def send_dead_letter_queue() -> Queue:
    """Commands that were invalid or failed for good, each with its reason in the headers."""
    return Queue(SEND_DEAD_LETTER_QUEUE_NAME, routing_key=SEND_DEAD_LETTER_QUEUE_NAME, durable=True)


def inbound_quarantine_queue() -> Queue:
    """Mail that cannot be handed over (too large, refused by the server), with its reason."""
    return Queue(INBOUND_QUARANTINE_QUEUE_NAME, durable=True)


def owned_by(service: str) -> tuple[Exchange | Queue, ...]:
    """What ``service`` declares as soon as it is connected (CONTRACT: every exchange and queue
    exists once the service that owns it has started, so a client may bind before the first
    message). Several services declare what they all write to; declaring is idempotent."""
    owned: dict[str, tuple[Exchange | Queue, ...]] = {
        "config-api": (CONFIG_EXCHANGE, INBOUND_EXCHANGE),
        "fetcher": (INBOUND_EXCHANGE, inbound_quarantine_queue(), status_reports_queue()),
        "sender": (
            send_queue(),
            SEND_RESULTS_EXCHANGE,
            send_dead_letter_queue(),
            status_reports_queue(),
        ),
        "status": (STATUS_EXCHANGE, status_reports_queue()),
    }
    return owned.get(service, ())


def declare_owned(service: str, channel: Any) -> None:
    for entity in owned_by(service):
        entity(channel).declare()
