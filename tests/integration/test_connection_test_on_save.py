"""An enabled save tests the connection first; a failure saves nothing (CONTRACT.md).

Today's probe checks what needs no mail protocol — a linked routing plan, the host name, the
TCP port — against real sockets on loopback.
"""

from __future__ import annotations

from cryptography.fernet import Fernet
from psycopg_pool import ConnectionPool

from shared.db.pool import DictConnection
from shared.secrets import SecretBox
from tests.support.api import ApiClient
from tests.support.leaks import password
from tests.support.tcp import closed_port, listening_port


def smtp(port: int, **extra: object) -> dict[str, object]:
    return {
        "type": "smtp",
        "name": "Ausgang",
        "host": "127.0.0.1",
        "port": port,
        "password": password("probe"),
        **extra,
    }


def test_enabled_save_with_a_refused_port_saves_nothing(api: ApiClient) -> None:
    port = closed_port()
    response = api.post("/email-servers", smtp(port, enabled=True))
    assert response.status_code == 422
    connection = response.json()["connection"]
    assert connection["ok"] is False
    assert connection["reason"] == f"connection refused by 127.0.0.1:{port}"
    assert connection["category"] == "refused"
    assert api.get("/email-servers").json()["items"] == []


def test_same_settings_can_be_saved_inactive(api: ApiClient) -> None:
    response = api.post("/email-servers", smtp(closed_port(), enabled=False))
    assert response.status_code == 201
    assert response.json()["enabled"] is False


def test_enabled_save_that_connects_carries_the_result(api: ApiClient) -> None:
    with listening_port() as port:
        response = api.post("/email-servers", smtp(port, enabled=True))
    assert response.status_code == 201, response.text
    assert response.json()["connection"]["ok"] is True
    assert api.get(f"/email-servers/{response.json()['id']}").json()["connection"]["ok"] is True


def test_enabling_by_patch_tests_with_the_stored_settings(api: ApiClient) -> None:
    port = closed_port()
    server = api.create(**smtp(port))
    path = f"/email-servers/{server['id']}"
    refused = api.patch(path, {"enabled": True})
    assert refused.status_code == 422
    assert api.get(path).json()["enabled"] is False
    with listening_port() as good:
        enabled = api.patch(path, {"enabled": True, "port": good})
    assert enabled.status_code == 200, enabled.text
    assert enabled.json()["enabled"] is True


def test_enabled_inbound_server_needs_a_routing_plan(api: ApiClient) -> None:
    body = {
        "type": "imap",
        "name": "in",
        "host": "127.0.0.1",
        "sni_hostname": "localhost",
        "enabled": True,
    }
    response = api.post("/email-servers", body)
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "routing_plan_id"
    plan = api.routing_plan()
    with listening_port() as port:
        saved = api.post("/email-servers", {**body, "routing_plan_id": plan, "port": port})
    assert saved.status_code == 201, saved.text


def test_test_endpoint_probes_an_unsaved_server(api: ApiClient) -> None:
    with listening_port() as port:
        ok = api.post("/email-servers/test", smtp(port))
    assert ok.status_code == 200
    assert ok.json()["ok"] is True and ok.json()["reason"] is None
    refused = api.post("/email-servers/test", smtp(closed_port())).json()
    assert refused["ok"] is False and refused["reason"].startswith("connection refused")
    unresolvable = api.post(
        "/email-servers/test", {**smtp(25), "host": "no-such-host.invalid"}
    ).json()
    assert unresolvable["category"] == "dns"
    assert "no-such-host.invalid" in unresolvable["reason"]
    assert api.get("/email-servers").json()["items"] == []


def test_test_endpoint_says_no_routing_plan_for_inbound(api: ApiClient) -> None:
    body = {"type": "pop3", "name": "in", "host": "127.0.0.1"}
    result = api.post("/email-servers/test", body).json()
    assert result == {**result, "ok": False, "reason": "no routing plan linked"}


def test_denied_networks_are_never_connected_to(api: ApiClient) -> None:
    """Link-local addresses (cloud metadata services) are refused by default."""
    result = api.post("/email-servers/test", {**smtp(80), "host": "169.254.169.254"}).json()
    assert result["ok"] is False
    assert result["reason"] == "connections to 169.254.169.254 are not allowed by this installation"


def test_successful_test_says_what_it_did_not_check_yet(api: ApiClient) -> None:
    with listening_port() as port:
        result = api.post("/email-servers/test", smtp(port)).json()
    assert result["ok"] is True
    assert "not tested yet" in result["note"]


def test_a_password_under_a_lost_key_asks_for_the_password_again(
    api: ApiClient, pool: ConnectionPool[DictConnection]
) -> None:
    server = api.create(**smtp(closed_port()))
    with pool.connection() as conn:
        lost_key = SecretBox([Fernet.generate_key().decode()]).encrypt("unknown")
        conn.execute("UPDATE email_servers SET password_encrypted = %s", (lost_key,))
    with listening_port() as port:
        answer = api.patch(f"/email-servers/{server['id']}", {"enabled": True, "port": port})
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["field"] == "password"
    assert "enter the password again" in answer.json()["detail"][0]["msg"]
