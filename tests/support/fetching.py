"""Helpers for fetcher tests: a running fetcher, lab mailboxes as servers, queue contents."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pika
from psycopg_pool import ConnectionPool

from services.fetcher.supervisor import FetcherSupervisor
from shared.db.pool import DictConnection
from shared.settings import Settings
from tests.lab.certs import LabCertificates
from tests.lab.dovecot import DovecotLab, LabUser
from tests.support.api import ApiClient


@dataclass(frozen=True)
class Delivered:
    body: bytes
    properties: Any


def fetcher_settings(settings: Settings, certs: LabCertificates, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "ca_bundle": certs.ca,
        "imap_poll_seconds": 1.0,
        "pop3_poll_seconds": 0.5,
        "mailbox_lease_seconds": 3.0,
        "fetch_retry_max_seconds": 2.0,
        "config_resync_seconds": 5.0,
    }
    values.update(overrides)
    return settings.model_copy(update=values)


@contextlib.contextmanager
def running_fetcher(
    settings: Settings, pool: ConnectionPool[DictConnection]
) -> Iterator[FetcherSupervisor]:
    supervisor = FetcherSupervisor(settings, pool)
    thread = supervisor.start_in_thread()
    try:
        assert supervisor.connected.wait(10), "fetcher did not connect to RabbitMQ"
        yield supervisor
    finally:
        supervisor.stop()
        thread.join(20)
        assert not thread.is_alive(), "fetcher did not stop"


def lab_mailbox(
    api: ApiClient,
    lab: DovecotLab,
    user: LabUser,
    server_type: str = "imap",
    *,
    tls: bool = True,
    plan: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """An enabled server for ``user``'s lab mailbox, created through the API."""
    ports = {
        ("imap", True): lab.imaps_port,
        ("imap", False): lab.imap_port,
        ("pop3", True): lab.pop3s_port,
        ("pop3", False): lab.pop3_port,
    }
    body: dict[str, Any] = {
        "type": server_type,
        "name": f"lab {user.name}",
        "host": "localhost",
        "port": ports[(server_type, tls)],
        "tls": tls,
        "username": user.name,
        "password": user.password,
        "routing_plan_id": plan or api.routing_plan(f"plan for {user.name}"),
        "enabled": True,
    }
    body.update(fields)
    return api.create(**body)


def lab_mailbox_and_queue(
    api: ApiClient, lab: DovecotLab, user: LabUser, amqp_url: str, *args: Any, **fields: Any
) -> tuple[dict[str, Any], str]:
    """:func:`lab_mailbox`, and the name of its routing plan's queue once RabbitMQ has it."""
    server = lab_mailbox(api, lab, user, *args, **fields)
    queue = f"mailroom.inbound.{server['routing_plan_id']}"
    wait_for_queue(amqp_url, queue)
    return server, queue


def wait_for_queue(amqp_url: str, queue: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        try:
            connection.channel().queue_declare(queue, passive=True)
            return
        except pika.exceptions.ChannelClosedByBroker:
            if time.monotonic() > deadline:
                raise
        finally:
            if connection.is_open:
                connection.close()
        time.sleep(0.05)


def take(amqp_url: str, queue: str, count: int, timeout: float = 10.0) -> list[Delivered]:
    """Consume messages from ``queue`` until ``count`` arrived (or the time is up)."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    got: list[Delivered] = []
    try:
        channel = connection.channel()
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                connection.sleep(0.02)
                continue
            got.append(Delivered(bytes(body), properties))
    finally:
        connection.close()
    return got


def queue_depth(amqp_url: str, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


def reports_for(
    amqp_url: str, server_id: str, timeout: float = 10.0, ok: bool | None = None
) -> list[dict[str, Any]]:
    """Status reports about ``server_id`` (``ok`` filters), waiting until one arrives."""
    import json

    from shared.topology import STATUS_REPORTS_QUEUE_NAME

    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.queue_declare(STATUS_REPORTS_QUEUE_NAME, durable=True)
        while not found and time.monotonic() < deadline:
            method, _, body = channel.basic_get(STATUS_REPORTS_QUEUE_NAME, auto_ack=True)
            if method is None:
                connection.sleep(0.05)
                continue
            report = json.loads(body)
            if report["server_id"] == server_id and (ok is None or report["ok"] is ok):
                found.append(report)
    finally:
        connection.close()
    return found
