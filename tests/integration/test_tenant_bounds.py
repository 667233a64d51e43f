"""One tenant cannot take what another tenant needs: connection tests and live status streams
are bounded per tenant and in total, and a refusal says so (429 with Retry-After).

Connection tests run for real against a port on loopback that accepts and never answers (a
mail server that hangs), so each holds its slot until the probe's timeout. The streams are
those of a real status process, with small limits.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import httpx2
import pytest
import redis
from fastapi.testclient import TestClient

from services.config_api.app import create_app
from services.config_api.email_server_service import EmailServerService
from shared.settings import Settings
from tests.lab.dovecot import free_port
from tests.support.api import admin
from tests.support.processes import ServiceProcess
from tests.support.status import StatusApi, healthy, reader
from tests.support.tcp import closed_port, listening_port
from tests.support.waiting import eventually

PROBE_SECONDS = 5.0  # a test against the silent port holds its slot this long


def smtp(port: int, **fields: Any) -> dict[str, Any]:
    return {"type": "smtp", "name": "out", "host": "127.0.0.1", "port": port, **fields}


@pytest.fixture
def bounded_api(settings: Settings) -> Iterator[TestClient]:
    """The config API allowing 3 connection tests at once, 2 of them to one tenant."""
    limited = settings.model_copy(
        update={
            "probe_concurrency": 3,
            "probe_concurrency_per_tenant": 2,
            "probe_timeout_seconds": PROBE_SECONDS,
        }
    )
    with TestClient(create_app(limited, run_relay=False)) as client:
        yield client


def test_one_tenants_hanging_tests_leave_the_other_tenants_saves_served(
    bounded_api: TestClient, settings: Settings
) -> None:
    service: EmailServerService = bounded_api.app.state.email_servers  # type: ignore[attr-defined]
    slots = service.probe_slots
    first, second, third = (admin(bounded_api, settings, t) for t in ("acme", "globex", "initech"))
    with listening_port() as silent, ThreadPoolExecutor(max_workers=4) as pool:
        hanging: list[Future[httpx2.Response]] = [
            pool.submit(first.post, "/email-servers/test", smtp(silent)) for _ in range(2)
        ]
        eventually(lambda: slots.held("acme") == 2, 5, "acme's two tests running")

        refused = first.post("/email-servers/test", smtp(silent))
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == str(int(PROBE_SECONDS))
        assert "your company already has 2 connection tests running" in refused.json()["detail"]
        saving = first.post("/email-servers", smtp(closed_port(), enabled=True))
        assert saving.status_code == 429  # an enabled save is tested first: refused, not saved
        assert first.get("/email-servers").json()["items"] == []

        # Meanwhile another tenant's save is tested and answered.
        served = second.post("/email-servers", smtp(closed_port(), enabled=True))
        assert served.status_code == 422, served.text
        assert served.json()["connection"]["reason"].startswith("connection refused")
        assert second.post("/email-servers", smtp(closed_port())).status_code == 201

        # The installation's limit holds for all tenants together.
        hanging.append(pool.submit(second.post, "/email-servers/test", smtp(silent)))
        eventually(lambda: slots.held() == 3, 5, "three tests running")
        crowded = third.post("/email-servers/test", smtp(closed_port()))
        assert crowded.status_code == 429
        assert "this installation already has 3 connection tests" in crowded.json()["detail"]

        for answer in hanging:
            assert answer.result(timeout=3 * PROBE_SECONDS).json()["ok"] is False
    assert slots.held() == 0
    again = first.post("/email-servers/test", smtp(closed_port()))
    assert again.status_code == 200 and again.json()["category"] == "refused"


# --- live status streams ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def status_service(settings: Settings) -> Iterator[tuple[str, ServiceProcess]]:
    """A status process allowing 3 live streams, 2 of them to one tenant."""
    port = free_port()
    env = {
        "MAILROOM_STATUS_PORT": str(port),
        "MAILROOM_STATUS_STREAMS": "3",
        "MAILROOM_STATUS_STREAMS_PER_TENANT": "2",
    }
    process = ServiceProcess("run", "status", env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        eventually(lambda: healthy(url), 20, "status service healthy")
        yield url, process
    finally:
        process.terminate()


class Stream:
    """One live stream on a socket of its own, read in a thread.

    A plain socket, so that ``close`` really ends the connection (``shutdown``) even while the
    reading thread waits in ``recv``, as a browser closing the tab does.
    """

    def __init__(self, api: StatusApi) -> None:
        self.events: list[tuple[str, Any]] = []
        address = urlsplit(api.url)
        self._sock = socket.create_connection((address.hostname, address.port), timeout=10)
        request = (
            "GET /api/v1/status/email-servers/stream HTTP/1.1\r\n"
            f"Host: {address.netloc}\r\nAuthorization: {api.headers['Authorization']}\r\n"
            "Accept: text/event-stream\r\n\r\n"
        )
        self._sock.sendall(request.encode())
        self._file = self._sock.makefile("rb")
        self.status_code = int(self._file.readline().split()[1])
        self.headers: dict[str, str] = {}
        while (line := self._file.readline().decode().strip()) != "":
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.body: Any = None
        if self.status_code == 200:
            threading.Thread(target=self._read, daemon=True).start()
        else:
            self.body = json.loads(self._file.read(int(self.headers["content-length"])))
            self.close()

    def _read(self) -> None:
        kind = ""
        with contextlib.suppress(OSError, ValueError):
            for raw in self._file:  # chunk sizes come between the lines; events are whole
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    self.events.append((kind, json.loads(line.removeprefix("data: "))))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


def feed_connections(settings: Settings, process: ServiceProcess) -> int:
    """The status process's Redis connections that carry live streams."""
    name = f"mailroom-status-streams-{process.process.pid}"
    client = redis.Redis.from_url(settings.redis_url)
    try:
        return sum(1 for c in client.client_list(_type="pubsub") if c.get("name") == name)
    finally:
        client.close()


def test_one_tenants_streams_leave_the_other_tenants_status_page_served(
    status_service: tuple[str, ServiceProcess], settings: Settings
) -> None:
    url, process = status_service
    tenants = [f"{name}-{uuid.uuid4().hex[:6]}" for name in ("acme", "globex", "initech")]
    first, second, third = (reader(url, settings, tenant) for tenant in tenants)
    opened: list[Stream] = []
    try:
        opened += [Stream(first), Stream(first)]
        assert [s.status_code for s in opened] == [200, 200]
        eventually(lambda: all(s.events for s in opened), 5, "both snapshots")

        refused = Stream(first)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "30"
        assert "your company already has 2 live status streams" in refused.body["detail"]

        opened.append(Stream(second))  # another tenant is served meanwhile
        assert opened[-1].status_code == 200
        eventually(lambda: opened[-1].events == [("snapshot", {"items": []})], 5, "snapshot")
        assert feed_connections(settings, process) == 1  # three streams, one Redis connection

        crowded = Stream(third)
        assert crowded.status_code == 429
        assert "this installation already has 3" in crowded.body["detail"]

        opened.pop(0).close()  # a closed stream gives its slot back
        eventually(lambda: _opens(third), 5, "a slot free again")
    finally:
        for stream in opened:
            stream.close()
    eventually(lambda: feed_connections(settings, process) == 0, 10, "the feed's connection back")


def _opens(api: StatusApi) -> bool:
    stream = Stream(api)
    stream.close()
    return stream.status_code == 200
