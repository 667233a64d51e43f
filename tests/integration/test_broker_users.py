"""deploy/rabbitmq/users.sh: each service and each publisher as its own RabbitMQ user, with the
least permissions it needs. The services run as those users on a vhost of their own and do
their work; the publishers can do nothing else, and the sender takes a publisher's command
only for the tenants ``MAILROOM_SEND_PUBLISHERS`` allows it."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pytest
from fastapi.testclient import TestClient

from shared.settings import Settings
from tests.lab.dovecot import free_port
from tests.support.api import admin
from tests.support.processes import ServiceProcess
from tests.support.sender import command, drain

USERS_SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "rabbitmq" / "users.sh"
SERVICES = ("config-api", "fetcher", "sender", "status")
READY = {
    "config-api": "outbox relay: declared the config API's exchanges",
    "fetcher": "fetcher: connected to RabbitMQ, consuming",
    "sender": "sender: connected to RabbitMQ, consuming",
    "status": "status: connected to RabbitMQ, consuming",
}


@dataclass(frozen=True)
class Broker:
    vhost: str
    prefix: str
    passwords: dict[str, str]

    def url(self, user: str) -> str:
        return f"amqp://{user}:{self.passwords[user]}@127.0.0.1:5672/{self.vhost}"

    @property
    def guest_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:5672/{self.vhost}"

    def service_user(self, service: str) -> str:
        return f"{self.prefix}mailroom-{service}"


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    tag = uuid.uuid4().hex[:8]
    vhost, prefix = f"mailroom_users_{tag}", f"t{tag}-"
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True)
    subprocess.run(  # the test's own eyes on the vhost (the dead letters)
        ["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
        check=True,
    )
    passwords = {f"{prefix}mailroom-{s}": secrets.token_urlsafe(16) for s in SERVICES}
    passwords |= {f"{prefix}helpdesk": secrets.token_urlsafe(16)}
    passwords |= {f"{prefix}alerts": secrets.token_urlsafe(16)}
    passwords |= {f"{prefix}helpdesk-results": secrets.token_urlsafe(16)}
    env = {
        **os.environ,
        "MAILROOM_VHOST": vhost,
        "MAILROOM_BROKER_USER_PREFIX": prefix,
        **{
            f"MAILROOM_{s.upper().replace('-', '_')}_AMQP_PASSWORD": passwords[
                f"{prefix}mailroom-{s}"
            ]
            for s in SERVICES
        },
        "MAILROOM_SEND_PUBLISHERS_AMQP": " ".join(
            f"{prefix}{name}:{passwords[f'{prefix}{name}']}" for name in ("helpdesk", "alerts")
        ),
        "MAILROOM_RESULT_READERS_AMQP": (
            f"{prefix}helpdesk-results:{passwords[f'{prefix}helpdesk-results']}"
        ),
    }
    subprocess.run(["bash", str(USERS_SCRIPT)], env=env, check=True)
    yield Broker(vhost, prefix, passwords)
    removals = [subprocess.Popen(["rabbitmqctl", "-q", "delete_user", u]) for u in passwords]
    removals.append(subprocess.Popen(["rabbitmqctl", "-q", "delete_vhost", vhost]))
    assert all(removal.wait() == 0 for removal in removals)


TENANT_B = f"b-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def tenant_b(client: TestClient, settings: Settings) -> str:
    """A company the sender knows (it has a routing plan), and no SMTP server."""
    admin(client, settings, TENANT_B).routing_plan("plan of B")
    return TENANT_B


@pytest.fixture(scope="module")
def services(broker: Broker) -> Iterator[dict[str, ServiceProcess]]:
    allowed = {f"{broker.prefix}helpdesk": [TENANT_B]}  # alerts: no tenant at all
    running = {
        service: ServiceProcess(
            "run",
            service,
            env={
                "MAILROOM_AMQP_URL": broker.url(broker.service_user(service)),
                "MAILROOM_API_PORT": str(free_port()),
                "MAILROOM_STATUS_PORT": str(free_port()),
                "MAILROOM_FETCHER_METRICS_PORT": "0",
                "MAILROOM_SENDER_METRICS_PORT": "0",
                "MAILROOM_SEND_PUBLISHERS": json.dumps(allowed),
            },
        )
        for service in SERVICES
    }
    try:
        for service, process in running.items():
            process.wait_for_log(READY[service], timeout=30)
        yield running
    finally:
        for process in running.values():
            process.terminate()


def test_each_service_runs_as_its_own_user(
    broker: Broker, services: dict[str, ServiceProcess]
) -> None:
    for service, process in services.items():
        assert "ACCESS_REFUSED" not in process.log(), f"{service}:\n{process.log()[-2000:]}"


class ResultsReader:
    """A results reader's own queue, bound to ``mailroom.send.results``."""

    def __init__(self, broker: Broker) -> None:
        user = f"{broker.prefix}helpdesk-results"
        self._connection = pika.BlockingConnection(pika.URLParameters(broker.url(user)))
        self._channel = self._connection.channel()
        self._queue = f"{user}.results.{uuid.uuid4().hex[:6]}"
        self._channel.queue_declare(self._queue, exclusive=True)
        self._channel.queue_bind(self._queue, "mailroom.send.results", routing_key="#")
        self._seen: list[dict[str, Any]] = []

    def result_of(self, request_id: str, timeout: float = 15) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [r for r in self._seen if r["request_id"] == request_id and r["final"]]
            if found:
                return found[0]
            method, _, payload = self._channel.basic_get(self._queue, auto_ack=True)
            if method is None:
                self._connection.sleep(0.05)
            else:
                self._seen.append(json.loads(payload))
        return None

    def close(self) -> None:
        self._connection.close()


@pytest.fixture
def reader(broker: Broker, services: dict[str, ServiceProcess]) -> Iterator[ResultsReader]:
    results = ResultsReader(broker)
    yield results
    results.close()


def publish_as(broker: Broker, name: str, body: dict[str, Any], user_id: str | None) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(broker.url(broker.prefix + name)))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.basic_publish(
        "",
        "mailroom.send",
        json.dumps(body).encode(),
        pika.BasicProperties(content_type="application/json", delivery_mode=2, user_id=user_id),
    )
    connection.close()


def test_a_publishers_command_for_its_tenant_is_taken_and_answered_to_a_results_reader(
    broker: Broker, services: dict[str, ServiceProcess], reader: ResultsReader, tenant_b: str
) -> None:
    body = command(tenant_b)
    publish_as(broker, "helpdesk", body, user_id=f"{broker.prefix}helpdesk")
    result = reader.result_of(body["request_id"])
    assert result is not None, services["sender"].log()[-3000:]
    # Taken: it failed only for want of an SMTP server (B has none), not for its publisher.
    assert (result["status"], result["category"]) == ("failed", "no_route"), result["reason"]


@pytest.mark.parametrize(
    ("publisher", "tenant", "why"),
    [
        ("helpdesk", "another", "may not send for tenant"),
        ("alerts", "b", "may not send for tenant"),
        ("alerts", "b-without-user-id", "a publisher without user_id"),
    ],
)
def test_a_command_its_publisher_may_not_send_is_answered_failed_and_dead_lettered(
    broker: Broker,
    services: dict[str, ServiceProcess],
    reader: ResultsReader,
    tenant_b: str,
    settings: Settings,
    publisher: str,
    tenant: str,
    why: str,
) -> None:
    body = command(tenant_b if tenant.startswith("b") else "another-company")
    user_id = None if tenant == "b-without-user-id" else broker.prefix + publisher
    publish_as(broker, publisher, body, user_id=user_id)
    result = reader.result_of(body["request_id"])
    assert result is not None, services["sender"].log()[-3000:]
    assert (result["status"], result["final"], result["category"]) == (
        "failed",
        True,
        "invalid_command",
    )
    assert why in result["reason"] and "MAILROOM_SEND_PUBLISHERS" in result["reason"]
    dead = drain(broker.guest_url, "mailroom.send.dead")
    assert any(json.loads(letter) == body for letter, _ in dead)


def test_rabbitmq_refuses_a_user_id_that_is_not_the_publishers_own(broker: Broker) -> None:
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
        publish_as(broker, "alerts", command("x"), user_id=f"{broker.prefix}helpdesk")
    assert refused.value.reply_code == 406  # PRECONDITION_FAILED


@pytest.mark.parametrize(
    "attempt",
    ["consume the commands", "publish a config event", "read the inbound mail"],
)
def test_a_publisher_can_do_nothing_but_send_commands(broker: Broker, attempt: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(broker.url(f"{broker.prefix}helpdesk")))
    channel = connection.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
        if attempt == "consume the commands":
            channel.basic_get("mailroom.send")
        elif attempt == "publish a config event":
            channel.confirm_delivery()
            channel.basic_publish("mailroom.config", "email_server.deleted", b"{}")
        else:
            channel.queue_declare("mailroom.inbound.quarantine", durable=True)
    assert refused.value.reply_code == 403  # ACCESS_REFUSED
    connection.close()
