"""The status service end to end: real fetcher and status processes, Dovecot, RabbitMQ, Redis.

Intervals are shortened for the test (poll and heartbeat 1 s, backoff at most 1 s), so "one
poll interval" is 1 s here; the production defaults scale the same rules up (README, Status).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
from fastapi.testclient import TestClient

from shared.settings import Settings
from tests.lab.certs import LabCertificates
from tests.lab.dovecot import DovecotLab, LabUser, free_port
from tests.support import rabbit
from tests.support.api import token_for
from tests.support.fetching import lab_mailbox
from tests.support.processes import ServiceProcess
from tests.support.sender import new_tenant
from tests.support.status import StatusApi, healthy, reader
from tests.support.waiting import eventually

POLL = 1.0


@pytest.fixture(scope="module")
def env(mail_lab_certs: LabCertificates) -> dict[str, str]:
    return {
        "MAILROOM_CA_BUNDLE": str(mail_lab_certs.ca),
        "MAILROOM_IMAP_POLL_SECONDS": str(POLL),
        "MAILROOM_POP3_POLL_SECONDS": str(POLL),
        "MAILROOM_STATUS_HEARTBEAT_SECONDS": str(POLL),
        "MAILROOM_FETCH_RETRY_MAX_SECONDS": "1",
        "MAILROOM_MAIL_SERVER_TIMEOUT_SECONDS": "2",
        "MAILROOM_MAILBOX_LEASE_SECONDS": "3",
        "MAILROOM_CONFIG_RESYNC_SECONDS": "5",
        "MAILROOM_FETCHER_METRICS_PORT": str(free_port()),
        "MAILROOM_STATUS_PORT": str(free_port()),
    }


@pytest.fixture(scope="module")
def status_url(env: dict[str, str]) -> Iterator[str]:
    process = ServiceProcess("run", "status", env=env)
    url = f"http://127.0.0.1:{env['MAILROOM_STATUS_PORT']}"
    try:
        eventually(lambda: healthy(url), 20, "status service healthy")
        yield url
    finally:
        process.terminate()


@pytest.fixture
def fetcher(env: dict[str, str]) -> Iterator[ServiceProcess]:
    process = ServiceProcess("run", "fetcher", env=env)
    process.wait_for_log("connected to RabbitMQ, consuming", timeout=20)
    yield process
    process.terminate()


def test_mail_server_down_is_failing_with_the_reason_and_back_ok(
    client: TestClient,
    settings: Settings,
    status_url: str,
    fetcher: ServiceProcess,
    dovecot: DovecotLab,
    lab_user: LabUser,
) -> None:
    admin, tenant = new_tenant(client, settings)
    status = reader(status_url, settings, tenant)
    alerts = rabbit.EventTap(settings.amqp_url, "mailroom.status").start()
    try:
        created = time.monotonic()
        server = lab_mailbox(admin, dovecot, lab_user)
        _, item = status.wait_state(server["id"], "ok", 10)
        print(f"\nFIGURE enabled save -> ok: {time.monotonic() - created:.2f} s")
        assert item["name"] == server["name"] and item["type"] == "imap"
        assert item["enabled"] is True and item["last_success_at"] and item["worker"]

        dovecot.stop()
        try:
            took, item = status.wait_state(server["id"], "failing", POLL + 2 + 2)
            print(f"FIGURE mail server down -> failing: {took:.2f} s")
            assert item["consecutive_failures"] >= 2 and item["last_error_at"]
            # The first failures may meet Dovecot half-way down; then the port refuses.
            eventually(
                lambda: (
                    "connection refused by localhost:" in (status.of(server["id"]) or {})["reason"]
                ),
                POLL + 2,
                "the reason: connection refused",
            )
        finally:
            dovecot.start()
        took, item = status.wait_state(server["id"], "ok", 10)
        print(f"FIGURE mail server up -> ok: {took:.2f} s")
        assert item["reason"] is None

        failing = alerts.wait_for(
            lambda r: r.routing_key == "failing" and r.body["server_id"] == server["id"]
        )
        assert len(failing) == 1, "one alert per change, no flapping"
        body = failing[0].body
        assert set(body) == {"tenant_id", "server_id", "state", "previous_state", "reason", "at"}
        assert body["tenant_id"] == tenant and body["state"] == "failing"
        assert body["previous_state"] == "ok" and f":{dovecot.imaps_port}" in body["reason"]
        assert failing[0].properties.delivery_mode == 2

        changed = time.monotonic()
        admin.patch(f"/email-servers/{server['id']}", {"enabled": False})
        took, _ = status.wait_state(server["id"], "disabled", 5)
        print(f"FIGURE config change -> new state: {time.monotonic() - changed:.2f} s")
    finally:
        alerts.stop()


def test_a_killed_fetcher_turns_its_servers_stale(
    client: TestClient,
    settings: Settings,
    status_url: str,
    env: dict[str, str],
    dovecot: DovecotLab,
    lab_user: LabUser,
) -> None:
    admin, tenant = new_tenant(client, settings)
    status = reader(status_url, settings, tenant)
    process = ServiceProcess("run", "fetcher", env=env)
    try:
        process.wait_for_log("connected to RabbitMQ, consuming", timeout=20)
        server = lab_mailbox(admin, dovecot, lab_user, "pop3")
        status.wait_state(server["id"], "ok", 10)
        metrics = httpx2.get(f"http://127.0.0.1:{env['MAILROOM_FETCHER_METRICS_PORT']}/metrics")
        assert 'mailroom_mailbox_polls_total{result="ok",type="pop3"}' in metrics.text
    finally:
        process.kill()
    took, item = status.wait_state(server["id"], "stale", 3 * POLL + 3)
    print(f"\nFIGURE fetcher killed -> stale: {took:.2f} s")
    assert item["reason"].startswith("no report from any fetcher")
    scraped = httpx2.get(f"{status_url}/metrics").text
    assert (
        f'mailroom_email_server_state{{mailroom_email_server_state="stale",'
        f'server_id="{server["id"]}",type="pop3"}} 1.0'
    ) in scraped


def test_another_tenant_never_sees_the_servers(
    client: TestClient,
    settings: Settings,
    status_url: str,
    fetcher: ServiceProcess,
    dovecot: DovecotLab,
    lab_user: LabUser,
) -> None:
    admin, tenant = new_tenant(client, settings)
    _, other_tenant = new_tenant(client, settings)
    mine, theirs = reader(status_url, settings, tenant), reader(status_url, settings, other_tenant)
    my_stream, their_stream = _Stream(mine).start(), _Stream(theirs).start()
    try:
        server = lab_mailbox(admin, dovecot, lab_user)
        mine.wait_state(server["id"], "ok", 10)
        eventually(lambda: my_stream.states(server["id"])[-1:] == ["ok"], 5, "stream shows ok")
        assert my_stream.states(server["id"])[0] == "connecting"
        assert theirs.items() == []
        one = httpx2.get(
            f"{status_url}/api/v1/status/email-servers/{server['id']}", headers=theirs.headers
        )
        assert one.status_code == 404
        assert their_stream.events[0] == ("snapshot", {"items": []})
        assert all(server["id"] not in json.dumps(data) for _, data in their_stream.events)
    finally:
        my_stream.stop()
        their_stream.stop()
    no_token = httpx2.get(f"{status_url}/api/v1/status/email-servers")
    assert no_token.status_code == 401
    wrong = token_for(settings, tenant, [])
    forbidden = httpx2.get(
        f"{status_url}/api/v1/status/email-servers", headers={"Authorization": f"Bearer {wrong}"}
    )
    assert forbidden.status_code == 403


class _Stream:
    """Reads the server-sent events of one token in a thread of its own."""

    def __init__(self, api: StatusApi) -> None:
        self.api = api
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._client = httpx2.Client(timeout=httpx2.Timeout(5, read=30))
        self._opened = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)

    def start(self) -> _Stream:
        self._thread.start()
        assert self._opened.wait(10), "stream did not open"
        eventually(lambda: bool(self.events), 5, "snapshot event")
        return self

    def _read(self) -> None:
        url = f"{self.api.url}/api/v1/status/email-servers/stream"
        kind = ""
        try:
            with self._client.stream("GET", url, headers=self.api.headers) as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                self._opened.set()
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        kind = line.removeprefix("event: ")
                    elif line.startswith("data: "):
                        self.events.append((kind, json.loads(line.removeprefix("data: "))))
        except (httpx2.HTTPError, RuntimeError):
            return  # closed by stop()

    def states(self, server_id: str) -> list[str]:
        return [d["state"] for k, d in self.events if k == "state" and d["server_id"] == server_id]

    def stop(self) -> None:
        self._client.close()
