"""deploy/rabbitmq/users.sh: each service and each publisher as its own RabbitMQ user, with the
least permissions it needs. The services run as those users on a vhost of their own and do
their work; the publishers can do nothing else."""

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

import pika
import pytest

from tests.lab.dovecot import free_port
from tests.support.processes import ServiceProcess
from tests.support.sender import command

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

    def service_user(self, service: str) -> str:
        return f"{self.prefix}mailroom-{service}"


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    tag = uuid.uuid4().hex[:8]
    vhost, prefix = f"mailroom_users_{tag}", f"t{tag}-"
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True)
    passwords = {f"{prefix}mailroom-{s}": secrets.token_urlsafe(16) for s in SERVICES}
    passwords |= {f"{prefix}helpdesk": secrets.token_urlsafe(16)}
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
        "MAILROOM_SEND_PUBLISHERS_AMQP": f"{prefix}helpdesk:{passwords[f'{prefix}helpdesk']}",
        "MAILROOM_RESULT_READERS_AMQP": (
            f"{prefix}helpdesk-results:{passwords[f'{prefix}helpdesk-results']}"
        ),
    }
    subprocess.run(["bash", str(USERS_SCRIPT)], env=env, check=True)
    yield Broker(vhost, prefix, passwords)
    removals = [subprocess.Popen(["rabbitmqctl", "-q", "delete_user", u]) for u in passwords]
    removals.append(subprocess.Popen(["rabbitmqctl", "-q", "delete_vhost", vhost]))
    assert all(removal.wait() == 0 for removal in removals)


@pytest.fixture(scope="module")
def services(broker: Broker) -> Iterator[dict[str, ServiceProcess]]:
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


def test_a_publishers_command_is_answered_to_a_results_reader(
    broker: Broker, services: dict[str, ServiceProcess]
) -> None:
    reader_user = f"{broker.prefix}helpdesk-results"
    reader = pika.BlockingConnection(pika.URLParameters(broker.url(reader_user)))
    channel = reader.channel()
    mine = f"{reader_user}.results"
    channel.queue_declare(mine, exclusive=True)
    channel.queue_bind(mine, "mailroom.send.results", routing_key="#")

    publisher_user = f"{broker.prefix}helpdesk"
    body = command("a-company-without-servers")
    publisher = pika.BlockingConnection(pika.URLParameters(broker.url(publisher_user)))
    send = publisher.channel()
    send.confirm_delivery()
    send.basic_publish(
        "",
        "mailroom.send",
        json.dumps(body).encode(),
        pika.BasicProperties(
            content_type="application/json", delivery_mode=2, user_id=publisher_user
        ),
    )
    publisher.close()

    deadline = time.monotonic() + 15
    result = None
    while result is None and time.monotonic() < deadline:
        method, _, payload = channel.basic_get(mine, auto_ack=True)
        if method is None:
            reader.sleep(0.05)
            continue
        candidate = json.loads(payload)
        if candidate["request_id"] == body["request_id"]:
            result = candidate
    reader.close()
    assert result is not None, services["sender"].log()[-3000:]
    assert result["status"] == "failed" and result["final"] is True


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
