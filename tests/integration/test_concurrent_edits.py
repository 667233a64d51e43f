"""Two admins editing one server: If-Match protects a stale form; versions always go up."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi.testclient import TestClient

from services.config_api.app import create_app
from shared.email_servers import EmailServer
from shared.probe import ProbeResult
from shared.settings import Settings
from tests.support.api import ApiClient, admin


def test_stale_if_match_answers_412_and_changes_nothing(api: ApiClient) -> None:
    server = api.create(type="imap", name="v1", host="imap.example.com")
    path = f"/email-servers/{server['id']}"
    first = api.patch(path, {"name": "v2"}, headers={"If-Match": '"1"'})
    assert first.status_code == 200
    assert first.headers["ETag"] == '"2"'
    stale = api.patch(path, {"name": "lost update"}, headers={"If-Match": '"1"'})
    assert stale.status_code == 412
    assert stale.json()["current_version"] == 2
    assert api.get(path).json()["name"] == "v2"


def test_without_if_match_last_write_wins_and_version_increases(api: ApiClient) -> None:
    server = api.create(type="imap", name="v1", host="imap.example.com")
    path = f"/email-servers/{server['id']}"
    versions = [api.patch(path, {"name": f"n{i}"}).json()["version"] for i in range(3)]
    assert versions == [2, 3, 4]
    assert api.patch(path, {}).json()["version"] == 5
    assert api.get(path).json()["name"] == "n2"


def test_weak_and_bare_version_tags_are_understood(api: ApiClient) -> None:
    server = api.create(type="imap", name="v1", host="imap.example.com")
    path = f"/email-servers/{server['id']}"
    assert api.patch(path, {"name": "a"}, headers={"If-Match": 'W/"1"'}).status_code == 200
    assert api.patch(path, {"name": "b"}, headers={"If-Match": "2"}).status_code == 200
    assert api.patch(path, {"name": "c"}, headers={"If-Match": "banana"}).status_code == 400


def test_a_save_made_during_a_connection_test_is_not_overwritten_by_untested_settings(
    settings: Settings,
) -> None:
    """Admin A enables (slow connection test); meanwhile admin B removes the routing plan.

    A must not end up saving an enabled IMAP server without a routing plan.
    """
    testing = threading.Event()

    def slow_ok(server: EmailServer, password: str | None) -> ProbeResult:
        testing.set()
        time.sleep(0.6)
        return ProbeResult(ok=True, reason=None)

    with TestClient(create_app(settings, probe=slow_ok, run_relay=False)) as client:
        api = admin(client, settings)
        plan = api.routing_plan()
        server = api.create(type="imap", name="in", host="imap.example.com", routing_plan_id=plan)
        path = f"/email-servers/{server['id']}"
        with ThreadPoolExecutor(max_workers=1) as pool:
            enabling = pool.submit(api.patch, path, {"enabled": True})
            assert testing.wait(5)
            assert api.patch(path, {"routing_plan_id": None}).status_code == 200
            answer = enabling.result()
        # Judged again on what is stored now: enabling without a routing plan breaks a rule.
        assert answer.status_code == 422, answer.text
        assert answer.json()["detail"][0]["field"] == "routing_plan_id"
        stored = api.get(path).json()
        assert stored["enabled"] is False and stored["routing_plan_id"] is None


def test_a_connection_test_on_settings_changed_meanwhile_must_be_repeated(
    settings: Settings,
) -> None:
    testing = threading.Event()

    def slow_ok(server: EmailServer, password: str | None) -> ProbeResult:
        testing.set()
        time.sleep(0.6)
        return ProbeResult(ok=True, reason=None)

    with TestClient(create_app(settings, probe=slow_ok, run_relay=False)) as client:
        api = admin(client, settings)
        server = api.create(type="smtp", name="out", host="smtp.example.com", port=2525)
        path = f"/email-servers/{server['id']}"
        with ThreadPoolExecutor(max_workers=1) as pool:
            enabling = pool.submit(api.patch, path, {"enabled": True})
            assert testing.wait(5)
            assert api.patch(path, {"port": 2526}).status_code == 200
            answer = enabling.result()
        assert answer.status_code == 409, answer.text
        assert api.get(path).json()["enabled"] is False


def test_a_stale_if_match_is_refused_before_the_connection_test(settings: Settings) -> None:
    tested: list[str] = []

    def recording(server: EmailServer, password: str | None) -> ProbeResult:
        tested.append(server.id)
        return ProbeResult(ok=True, reason=None)

    with TestClient(create_app(settings, probe=recording, run_relay=False)) as client:
        api = admin(client, settings)
        server = api.create(type="smtp", name="out", host="smtp.example.com")
        api.patch(f"/email-servers/{server['id']}", {"name": "v2"})
        stale = api.patch(
            f"/email-servers/{server['id']}", {"enabled": True}, headers={"If-Match": '"1"'}
        )
        assert stale.status_code == 412
        assert tested == []
