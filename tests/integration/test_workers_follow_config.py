"""Fetcher, sender and status start, connect to RabbitMQ and follow their config events."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY
from psycopg_pool import ConnectionPool

from services.fetcher.supervisor import FetcherSupervisor
from shared.db.pool import DictConnection
from shared.email_servers import EmailServer, ServerType
from shared.server_directory import ServerDirectory
from shared.settings import Settings
from shared.worker import Subscription, Worker
from tests.support import rabbit
from tests.support.api import ApiClient
from tests.support.processes import ServiceProcess
from tests.support.tcp import TcpProxy
from tests.support.waiting import eventually


@pytest.fixture(scope="module")
def services() -> Iterator[dict[str, ServiceProcess]]:
    started = {name: ServiceProcess("run", name) for name in ("fetcher", "sender", "status")}
    env_status = started["status"]
    try:
        for process in started.values():
            process.wait_for_log("connected to RabbitMQ, consuming", timeout=20)
        assert env_status.process.poll() is None
        yield started
    finally:
        for process in started.values():
            process.kill()


def test_each_worker_learns_of_its_servers_within_a_second(
    api: ApiClient, services: dict[str, ServiceProcess]
) -> None:
    started = time.monotonic()
    imap = api.create(type="imap", name="in", host="imap.example.com")
    smtp = api.create(type="smtp", name="out", host="smtp.example.com")
    seen_imap = f"fetcher: server {imap['id']} (imap, version 1) disabled"
    seen_smtp = f"sender: server {smtp['id']} (smtp, version 1) disabled"
    services["fetcher"].wait_for_log(seen_imap, timeout=2)
    services["sender"].wait_for_log(seen_smtp, timeout=2)
    services["status"].wait_for_log(f"status: server {imap['id']}", timeout=2)
    services["status"].wait_for_log(f"status: server {smtp['id']}", timeout=2)
    assert time.monotonic() - started < 2.0  # both creates plus delivery
    assert smtp["id"] not in services["fetcher"].log()  # the fetcher serves inbound only
    assert imap["id"] not in services["sender"].log()

    api.delete(f"/email-servers/{imap['id']}")
    services["fetcher"].wait_for_log(f"fetcher: server {imap['id']} removed", timeout=1)


def test_worker_reconnects_after_the_broker_drops_it(
    api: ApiClient, settings: Settings, pool: ConnectionPool[DictConnection]
) -> None:
    worker = FetcherSupervisor(settings, pool)
    thread = worker.start_in_thread()
    try:
        assert worker.connected.wait(10)
        rabbit.close_all_connections()
        eventually(lambda: worker.connections_made == 2, 15, "the worker reconnected")
        server = api.create(type="pop3", name="after the drop", host="pop.example.com")
        eventually(lambda: worker.directory.get(server["id"]) is not None, 2, "the server known")
        assert thread.is_alive()
    finally:
        worker.stop()
        thread.join(10)


def test_worker_stops_gracefully_on_sigterm() -> None:
    fetcher = ServiceProcess("run", "fetcher")
    fetcher.wait_for_log("connected to RabbitMQ, consuming", timeout=20)
    fetcher.process.send_signal(signal.SIGTERM)
    assert fetcher.terminate(timeout=10) == 0
    assert "fetcher: SIGTERM received, stopping" in fetcher.log()
    assert "fetcher: stopped" in fetcher.log()
    assert "Traceback" not in fetcher.log()


def test_worker_stops_on_sigterm_while_rabbitmq_is_away(settings: Settings) -> None:
    proxy = TcpProxy(5672)
    proxy.start()
    via_proxy = settings.amqp_url.replace(":5672/", f":{proxy.port}/")
    fetcher = ServiceProcess("run", "fetcher", env={"MAILROOM_AMQP_URL": via_proxy})
    try:
        fetcher.wait_for_log("connected to RabbitMQ, consuming", timeout=20)
        proxy.stop()  # the broker is gone for this worker; it keeps trying to reconnect
        fetcher.wait_for_log("RabbitMQ unavailable", timeout=10)
        started = time.monotonic()
        fetcher.process.send_signal(signal.SIGTERM)
        assert fetcher.terminate(timeout=10) == 0
        assert time.monotonic() - started < 5
        assert "stopped while RabbitMQ was unavailable" in fetcher.log()
    finally:
        fetcher.kill()
        proxy.stop()


def test_a_change_its_listener_failed_on_is_told_again_at_the_next_resync(
    api: ApiClient, pool: ConnectionPool[DictConnection]
) -> None:
    """Not kept as known while the worker never acted on it (a mailbox never polled)."""
    server = api.create(type="imap", name="in", host="imap.example.com")
    told: list[str | None] = []

    def listener(before: EmailServer | None, after: EmailServer | None) -> None:
        if after is not None and after.id == server["id"]:
            told.append(after.id)
            if len(told) == 1:
                raise RuntimeError("can't start new thread")

    directory = ServerDirectory(pool, (ServerType.IMAP,), listener)
    directory.tick()  # the first resync: the listener fails on the server
    assert told == [server["id"]]
    assert directory.get(server["id"]) is None and not directory.current
    directory.tick()  # the next one tells it again
    assert told == [server["id"]] * 2
    assert directory.get(server["id"]) is not None and directory.current
    directory.tick()
    assert len(told) == 2  # nothing new: not told again


class _FlakyClock(Worker):
    """A worker whose periodic work fails until told it is fixed."""

    service_name = "flaky-clock"

    def __init__(self, amqp_url: str) -> None:
        super().__init__(amqp_url)
        self.broken = True
        self.ticks = 0

    def subscriptions(self) -> list[Subscription]:
        return []

    def tick(self) -> None:
        self.ticks += 1
        if self.broken:
            raise ValueError("a bug in the periodic work")


def test_periodic_work_that_fails_is_retried_and_never_ends_the_consumer(
    settings: Settings,
) -> None:
    worker = _FlakyClock(settings.amqp_url)
    thread = worker.start_in_thread()
    try:
        assert worker.connected.wait(10)
        eventually(lambda: worker.ticks >= 3, 10, "several ticks, each failing")
        assert thread.is_alive() and worker.consuming
        assert worker.ticks_failing_since is not None
        failures = REGISTRY.get_sample_value(
            "mailroom_worker_tick_failures_total", {"service": "flaky-clock"}
        )
        assert failures is not None and failures >= 3
        worker.broken = False  # fixed
        eventually(lambda: worker.ticks_failing_since is None, 5, "ticks work again")
        assert thread.is_alive()
    finally:
        worker.stop()
        thread.join(10)
