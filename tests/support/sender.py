"""Helpers for the sender's tests: publish commands as any client would, read what comes back."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import pika
import pytest
from fastapi.testclient import TestClient

from services.sender.connections import SmtpConnections
from shared.mail.connector import Connector
from shared.settings import Settings
from tests.lab.certs import LabCertificates
from tests.lab.fixtures import SMTP_DEFAULT_USER
from tests.lab.smtp_server import SmtpLab
from tests.support import rabbit
from tests.support.api import ApiClient, admin
from tests.support.processes import ServiceProcess

SEND_QUEUE = "mailroom.send"
DEAD_QUEUE = "mailroom.send.dead"
REPORTS_QUEUE = "mailroom.status.reports"


def new_tenant(client: TestClient, settings: Settings) -> tuple[ApiClient, str]:
    """An admin of a company of its own: servers of earlier tests never get in the way."""
    tenant = f"acme-{uuid.uuid4().hex[:8]}"
    return admin(client, settings, tenant), tenant


def smtp_server(
    lab: SmtpLab,
    username: str,
    *,
    name: str | None = None,
    tls: bool = False,
    sender_addresses: list[str] | None = None,
    password: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Fields of an enabled SMTP server on the lab (STARTTLS port, or implicit TLS)."""
    return {
        "type": "smtp",
        "name": name or f"SMTP {username}",
        "host": "127.0.0.1",
        "port": lab.tls_port if tls else lab.port,
        "tls": tls,
        "auth_type": "basic",
        "username": username,
        "password": password if password is not None else lab.users[username],
        "sender_addresses": sender_addresses or [],
        "enabled": True,
        "role": "agent",
        **extra,
    }


def sender_env(certs: LabCertificates, default_lab: SmtpLab, **overrides: str) -> dict[str, str]:
    env = {
        "MAILROOM_CA_BUNDLE": str(certs.ca),
        "MAILROOM_SENDER_RETRY_MIN_BACKOFF_SECONDS": "0.2",
        "MAILROOM_SENDER_RETRY_MAX_BACKOFF_SECONDS": "0.5",
        "MAILROOM_SENDER_RETRY_DEADLINE_SECONDS": "30",
        "MAILROOM_SENDER_STATUS_REPORT_SECONDS": "0.5",
        "MAILROOM_SENDER_SMTP_TIMEOUT_SECONDS": "10",
        "MAILROOM_DEFAULT_SMTP_HOST": "127.0.0.1",
        "MAILROOM_DEFAULT_SMTP_PORT": str(default_lab.port),
        "MAILROOM_DEFAULT_SMTP_USERNAME": SMTP_DEFAULT_USER,
        "MAILROOM_DEFAULT_SMTP_PASSWORD": default_lab.users[SMTP_DEFAULT_USER],
        "MAILROOM_DEFAULT_SMTP_FROM": "Mailroom <noreply@default.test>",
    }
    env.update(overrides)
    return env


def start_sender(env: dict[str, str]) -> ServiceProcess:
    process = ServiceProcess("run", "sender", env=env)
    try:
        process.wait_for_log("taking send commands", timeout=20)
    except BaseException:
        process.kill()  # never left behind, consuming the next run's commands
        raise
    return process


def wait_known(sender: ServiceProcess, server: dict[str, Any]) -> None:
    """Until the running sender has seen this server (config event)."""
    sender.wait_for_log(f"sender: server {server['id']} (smtp, version {server['version']})", 3)


def command(tenant_id: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "request_id": str(uuid.uuid4()),
        "tenant_id": tenant_id,
        "kind": "agent",
        "to": ["Customer <customer@example.org>"],
        "subject": "Hello",
        "text": "Hello there",
    }
    body.update(fields)
    return body


def publish(
    amqp_url: str, *bodies: dict[str, Any] | bytes, content_type: str = "application/json"
) -> None:
    """Publish commands to ``mailroom.send``, in order, over one connection, confirmed."""
    conn = rabbit.connect(amqp_url)
    try:
        channel = conn.channel()
        channel.queue_declare(SEND_QUEUE, durable=True)
        channel.confirm_delivery()
        for body in bodies:
            channel.basic_publish(
                "",
                SEND_QUEUE,
                body if isinstance(body, bytes) else json.dumps(body).encode(),
                pika.BasicProperties(content_type=content_type, delivery_mode=2),
            )
    finally:
        conn.close()


@dataclass
class DeadLetter:
    body: bytes
    headers: dict[str, Any]

    @property
    def request_id(self) -> str:
        return str(self.headers.get("x-request-id", ""))


def drain(amqp_url: str, queue: str) -> list[tuple[bytes, dict[str, Any]]]:
    """Every message now in ``queue``, removed from it."""
    found: list[tuple[bytes, dict[str, Any]]] = []
    conn = rabbit.connect(amqp_url)
    try:
        channel = conn.channel()
        channel.queue_declare(queue, durable=True)
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return found
            found.append((body, dict(properties.headers or {})))
    finally:
        conn.close()


class DeadLetters:
    """What arrived in ``mailroom.send.dead`` (kept across calls)."""

    def __init__(self, amqp_url: str) -> None:
        self.amqp_url = amqp_url
        self.seen: list[DeadLetter] = []

    def wait_for(self, request_id: str | None, timeout: float = 10.0) -> DeadLetter:
        deadline = time.monotonic() + timeout
        while True:
            self.seen += [DeadLetter(b, h) for b, h in drain(self.amqp_url, DEAD_QUEUE)]
            for letter in self.seen:
                if request_id is None or letter.request_id == request_id:
                    return letter
            if time.monotonic() > deadline:
                raise AssertionError(f"no dead letter for {request_id}; have {self.seen}")
            time.sleep(0.05)

    def for_request(self, request_id: str) -> list[DeadLetter]:
        self.seen += [DeadLetter(b, h) for b, h in drain(self.amqp_url, DEAD_QUEUE)]
        return [letter for letter in self.seen if letter.request_id == request_id]


@contextmanager
def results_tap(amqp_url: str) -> Iterator[rabbit.EventTap]:
    tap = rabbit.EventTap(amqp_url, "mailroom.send.results").start()
    try:
        yield tap
    finally:
        tap.stop()


@pytest.fixture
def smtp_connections(mail_lab_certs: LabCertificates) -> Iterator[SmtpConnections]:
    """The sender's SMTP connection pool, one connection per server, on its own."""
    connector = replace(Connector.from_settings(Settings(), 10), ca_bundle=mail_lab_certs.ca)
    pool = SmtpConnections(per_server=1, idle_seconds=60, connector=connector)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def results(settings: Settings) -> Iterator[rabbit.EventTap]:
    """Every send result published while the test runs."""
    with results_tap(settings.amqp_url) as tap:
        yield tap


def send(
    amqp_url: str, results: rabbit.EventTap, body: dict[str, Any], timeout: float = 10.0
) -> list[dict[str, Any]]:
    """Publish ``body`` as any client would and wait for its results, the final one last."""
    publish(amqp_url, body)
    return results_for(results, body["request_id"], timeout=timeout)


def results_for(
    tap: rabbit.EventTap, request_id: str, *, final: bool = True, timeout: float = 10.0
) -> list[dict[str, Any]]:
    """Results of one request, waiting until its final one (or any, with ``final=False``)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [r.body for r in tap.snapshot() if r.body.get("request_id") == request_id]
        if (found and not final) or any(r["final"] for r in found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no final result for {request_id}; have {found}")
        time.sleep(0.02)
