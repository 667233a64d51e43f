"""The status service outlives Redis being away: a real status process whose Redis is behind a
switchable proxy (the real Redis behind it), on the real PostgreSQL and RabbitMQ.

A module of its own: another status process (test_status_service's) would write what this
one misses straight into the same Redis.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import replace

import httpx2
import pytest
from fastapi.testclient import TestClient
from psycopg_pool import ConnectionPool

from services.status.state import ServerStatus, configure, now
from services.status.store import StatusStore, server_key
from services.status.worker import StatusWorker
from shared.db import email_servers
from shared.db.pool import DictConnection
from shared.email_servers import EmailServer
from shared.settings import Settings
from tests.lab.dovecot import DovecotLab, LabUser, free_port
from tests.support.fetching import lab_mailbox
from tests.support.processes import ServiceProcess
from tests.support.sender import new_tenant
from tests.support.status import healthy, reader
from tests.support.tcp import TcpProxy
from tests.support.waiting import eventually


@pytest.fixture
def redis_path() -> Iterator[TcpProxy]:
    proxy = TcpProxy(6379)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def status_url(settings: Settings, redis_path: TcpProxy) -> Iterator[tuple[str, ServiceProcess]]:
    port = free_port()
    env = {
        "MAILROOM_REDIS_URL": settings.redis_url.replace(":6379/", f":{redis_path.port}/"),
        "MAILROOM_STATUS_PORT": str(port),
    }
    process = ServiceProcess("run", "status", env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        eventually(lambda: healthy(url), 20, "status service healthy")
        yield url, process
    finally:
        process.terminate()


def stored(settings: Settings, server_id: str) -> ServerStatus | None:
    """The status as Redis holds it (the API shows one for a server without it, too)."""
    return StatusStore.from_url(settings.redis_url).get(server_id)


def test_the_status_service_waits_out_redis_and_catches_up_with_what_changed_meanwhile(
    client: TestClient,
    settings: Settings,
    status_url: tuple[str, ServiceProcess],
    redis_path: TcpProxy,
    dovecot: DovecotLab,
    lab_user: LabUser,
) -> None:
    url, process = status_url
    admin, tenant = new_tenant(client, settings)
    status = reader(url, settings, tenant)
    kept = lab_mailbox(admin, dovecot, lab_user, enabled=False, name="kept")
    gone = lab_mailbox(admin, dovecot, lab_user, enabled=False, name="gone")
    eventually(lambda: stored(settings, gone["id"]) is not None, 10, "statuses stored")

    redis_path.stop()
    eventually(
        lambda: httpx2.get(f"{url}/healthz", timeout=1).status_code == 503,
        10,
        "not ready while Redis is away",
    )
    added = lab_mailbox(admin, dovecot, lab_user, enabled=False, name="added")
    assert admin.delete(f"/email-servers/{gone['id']}").status_code == 204
    process.wait_for_log("Redis unavailable", timeout=10)
    time.sleep(3)  # the config events, and several ticks, meet Redis away
    redis_path.start()

    eventually(lambda: healthy(url), 15, "ready again: its consumer still runs")
    eventually(lambda: stored(settings, added["id"]) is not None, 10, "saved meanwhile: stored")
    eventually(lambda: stored(settings, gone["id"]) is None, 10, "deleted meanwhile: removed")
    added_status = stored(settings, added["id"])
    assert added_status is not None and added_status.state.value == "disabled"
    assert [i["name"] for i in status.items()] == ["added", "kept"]

    # A stored status this version cannot read (another version's fields) is none, not a 500.
    StatusStore.from_url(settings.redis_url).redis.set(
        server_key(kept["id"]), b'{"written_by": "another version"}'
    )
    assert {i["name"]: i["state"] for i in status.items()} == {
        "added": "disabled",
        "kept": "disabled",
    }
    log = process.log()
    assert log.count("Redis unavailable") == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert "Redis is back" in log


def test_reconciling_keeps_what_a_replica_knows_better_and_statuses_of_servers_that_exist(
    client: TestClient,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
    dovecot: DovecotLab,
    lab_user: LabUser,
) -> None:
    """One replica's directory may lag behind the database and the others: its reconcile
    must neither set a newer status back nor remove the status of a server created since it
    read the database."""
    admin, _ = new_tenant(client, settings)
    known = lab_mailbox(admin, dovecot, lab_user, enabled=False, name="known")
    worker = StatusWorker(settings, pool)
    try:
        worker.directory.resync()
        server = worker.directory.get(known["id"])
        assert server is not None
        newer = replace(server, version=server.version + 1, enabled=True)
        worker.store.update(server.id, lambda _: configure(None, newer, now()))
        created_since = lab_mailbox(admin, dovecot, lab_user, enabled=False, name="created since")
        worker.store.update(
            created_since["id"],
            lambda _: configure(None, email_servers_row(pool, created_since["id"]), now()),
        )
        never_existed = str(uuid.uuid4())
        worker.store.update(never_existed, lambda _: configure(None, newer, now()))
        assert worker.directory.get(created_since["id"]) is None  # this replica is behind

        worker.reconcile()

        kept = worker.store.get(server.id)
        assert kept is not None
        assert (kept.version, kept.state.value) == (newer.version, "connecting")
        assert worker.store.get(created_since["id"]) is not None
        assert worker.store.get(never_existed) is None
    finally:
        worker.alerts.close()


def email_servers_row(pool: ConnectionPool[DictConnection], server_id: str) -> EmailServer:
    with pool.connection() as conn:
        server = email_servers.get(conn, server_id)
    assert server is not None
    return server
