"""Every change reaches the workers as an event on ``mailroom.config`` within a second."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pytest
from fastapi.testclient import TestClient
from psycopg_pool import ConnectionPool

from services.config_api.app import create_app
from shared.contracts import ConfigEvent
from shared.db import outbox
from shared.db.pool import DictConnection
from shared.settings import Settings
from tests.support.api import ApiClient, admin
from tests.support.leaks import SECRET_MARKER, password
from tests.support.rabbit import EventTap, Received
from tests.support.tcp import TcpProxy

REQUIRED = {"event_id", "tenant_id", "server_id", "server_type", "version", "occurred_at"}


def for_server(server_id: str) -> Callable[[Received], bool]:
    return lambda r: r.body.get("server_id") == server_id


def test_create_update_delete_publish_events_within_a_second(
    api: ApiClient, config_events: EventTap
) -> None:
    started = time.monotonic()
    server = api.create(type="imap", name="n", host="imap.example.com", password=password("ev"))
    api.patch(f"/email-servers/{server['id']}", {"password": password("ev2"), "name": "m"})
    api.delete(f"/email-servers/{server['id']}")
    events = config_events.wait_for(for_server(server["id"]), count=3)
    assert [e.routing_key for e in events] == [
        "email_server.created",
        "email_server.updated",
        "email_server.deleted",
    ]
    assert max(e.at for e in events) - started < 1.0
    for event in events:
        assert set(event.body) >= REQUIRED
        assert event.body["tenant_id"] == "acme" and event.body["server_type"] == "imap"
        assert event.properties.delivery_mode == 2
        assert event.properties.message_id == event.body["event_id"]
        assert SECRET_MARKER.encode() not in event.raw
        ConfigEvent.model_validate(event.body)
    assert [e.body["version"] for e in events] == [1, 2, 3]
    assert set(events[1].body["changed_fields"]) == {"name", "password"}
    metrics = api.get("/metrics").text
    published = re.search(r"^mailroom_config_events_published_total (\S+)$", metrics, re.M)
    assert published is not None and float(published.group(1)) >= 3
    assert "mailroom_config_event_delay_seconds_bucket" in metrics


def test_moving_the_template_server_announces_both_servers(
    api: ApiClient, config_events: EventTap
) -> None:
    first = api.create(type="smtp", name="a", host="smtp.example.com", is_template_server=True)
    second = api.create(type="smtp", name="b", host="smtp.example.com")
    api.put("/template-server", {"server_id": second["id"]})
    moved = config_events.wait_for(lambda r: r.routing_key == "email_server.updated", count=2)
    assert {e.body["server_id"] for e in moved} == {first["id"], second["id"]}


def test_creating_a_routing_plan_declares_its_queue(api: ApiClient, settings: Settings) -> None:
    """A mail published to ``mailroom.inbound`` with the plan's id lands in the plan's queue."""
    plan = api.routing_plan("Rechnungen")
    queue = f"mailroom.inbound.{plan}"
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        deadline = time.monotonic() + 5
        while True:  # the relay declares the queue, then binds it, within milliseconds
            try:
                channel.basic_publish("mailroom.inbound", plan, b"probe", mandatory=True)
                break
            except (pika.exceptions.UnroutableError, pika.exceptions.ChannelClosedByBroker):
                assert time.monotonic() < deadline, "the plan's queue never got its binding"
                if channel.is_closed:  # the exchange itself did not exist yet
                    channel = connection.channel()
                    channel.confirm_delivery()
                time.sleep(0.02)
        assert channel.queue_declare(queue, passive=True).method.message_count == 1
        channel.queue_delete(queue)
    finally:
        connection.close()


def test_a_change_that_fails_after_writing_its_event_publishes_nothing(
    api: ApiClient,
    pool: ConnectionPool[DictConnection],
    config_events: EventTap,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_enqueue = outbox.enqueue

    def enqueue_then_fail(*args: Any, **kwargs: Any) -> None:
        real_enqueue(*args, **kwargs)
        raise RuntimeError("the change failed after writing its event")

    monkeypatch.setattr(outbox, "enqueue", enqueue_then_fail)
    with pytest.raises(RuntimeError):
        api.post("/email-servers", {"type": "imap", "name": "doomed", "host": "imap.example.com"})
    monkeypatch.undo()
    time.sleep(1.5)  # three relay polls
    assert config_events.wait_for(lambda r: r.routing_key.startswith("email_server"), 0) == []
    with pool.connection() as conn:
        assert outbox.pending(conn) == []
        assert conn.execute("SELECT count(*) AS n FROM email_servers").fetchone() == {"n": 0}


@pytest.fixture
def only_this_tests_relay(client: TestClient) -> Iterator[None]:
    """The session's config API relay steps aside, so the test's own relay is the publisher."""
    client.app.state.relay.stop()  # type: ignore[attr-defined]
    yield
    client.app.state.relay.start()  # type: ignore[attr-defined]


@pytest.mark.usefixtures("only_this_tests_relay")
def test_changes_made_while_rabbitmq_is_away_arrive_once_in_order(
    settings: Settings, config_events: EventTap
) -> None:
    """The relay's path to the broker is cut; the API keeps working; nothing is lost."""
    proxy = TcpProxy(5672)
    amqp_via_proxy = settings.amqp_url.replace(":5672/", f":{proxy.port}/")
    isolated = settings.model_copy(update={"amqp_url": amqp_via_proxy})
    with TestClient(create_app(isolated)) as client:
        api = admin(client, isolated)
        first = api.create(type="imap", name="a", host="imap.example.com")
        second = api.create(type="smtp", name="b", host="smtp.example.com")
        for i in range(9):
            api.patch(f"/email-servers/{first['id']}", {"name": f"a{i}"})
            api.patch(f"/email-servers/{second['id']}", {"name": f"b{i}"})
        time.sleep(1.0)
        assert config_events.wait_for(for_server(first["id"]), timeout=0) == []
        proxy.start()
        try:
            firsts = config_events.wait_for(for_server(first["id"]), timeout=15, count=10)
            seconds = config_events.wait_for(for_server(second["id"]), timeout=5, count=10)
            time.sleep(0.5)  # would-be duplicates get a chance to show up
            firsts = config_events.wait_for(for_server(first["id"]), timeout=0)
            seconds = config_events.wait_for(for_server(second["id"]), timeout=0)
        finally:
            proxy.stop()
    assert [e.body["version"] for e in firsts] == list(range(1, 11))
    assert [e.body["version"] for e in seconds] == list(range(1, 11))


@pytest.mark.usefixtures("only_this_tests_relay")
def test_the_relay_outlives_an_unexpected_failure(
    settings: Settings, config_events: EventTap, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_pending = outbox.pending
    failures = iter([RuntimeError("a bug"), KeyError("routing_plan_id")])

    def pending_that_fails_twice(*args: Any, **kwargs: Any) -> list[outbox.OutboxEntry]:
        for failure in failures:
            raise failure
        return real_pending(*args, **kwargs)

    monkeypatch.setattr(outbox, "pending", pending_that_fails_twice)
    with TestClient(create_app(settings)) as client:
        api = admin(client, settings)
        server = api.create(type="smtp", name="after the bug", host="smtp.example.com")
        assert config_events.wait_for(for_server(server["id"]), timeout=10)
        assert client.app.state.relay.alive  # type: ignore[attr-defined]
        assert api.get("/healthz").status_code == 200
