"""An enabled save tests the connection first; a failure saves nothing (CONTRACT.md).

The config API's probe logs in for real: to the mail lab's SMTP server (aiosmtpd) and Dovecot,
trusting the lab's CA (the session's config API is configured with it).
"""

from __future__ import annotations

from typing import Any

from cryptography.fernet import Fernet
from psycopg_pool import ConnectionPool

from shared.db.pool import DictConnection
from shared.secrets import SecretBox
from tests.lab.dovecot import DovecotLab, LabUser
from tests.lab.fixtures import SMTP_LAB_USER
from tests.lab.smtp_server import SmtpLab
from tests.support.api import ApiClient
from tests.support.leaks import password
from tests.support.tcp import closed_port


def smtp(port: int, **extra: object) -> dict[str, object]:
    return {
        "type": "smtp",
        "name": "Ausgang",
        "host": "127.0.0.1",
        "port": port,
        "tls": False,  # STARTTLS
        "username": SMTP_LAB_USER,
        "password": password("probe"),
        **extra,
    }


def lab_smtp(lab: SmtpLab, **extra: object) -> dict[str, object]:
    return smtp(lab.port, password=lab.users[SMTP_LAB_USER], **extra)


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


def test_enabled_save_with_a_wrong_password_saves_nothing_inactive_saves(
    api: ApiClient, smtp_lab: SmtpLab
) -> None:
    body = smtp(smtp_lab.port, enabled=True)  # a password the server does not accept
    refused = api.post("/email-servers", body)
    assert refused.status_code == 422
    connection = refused.json()["connection"]
    assert connection["category"] == "authentication"
    assert connection["reason"].startswith("authentication failed:")
    assert "Connection failed: authentication failed" in refused.json()["detail"]
    assert api.get("/email-servers").json()["items"] == []
    saved = api.post("/email-servers", {**body, "enabled": False})
    assert saved.status_code == 201
    assert saved.json()["enabled"] is False and saved.json()["has_password"] is True


def test_imap_wrong_password_and_missing_folder_answer_422(
    api: ApiClient, dovecot: DovecotLab, lab_user: LabUser
) -> None:
    body: dict[str, Any] = {
        "type": "imap",
        "name": "in",
        "host": "localhost",
        "port": dovecot.imaps_port,
        "tls": True,
        "username": lab_user.name,
        "password": password("wrong"),
        "routing_plan_id": api.routing_plan(),
        "enabled": True,
    }
    wrong = api.post("/email-servers", body)
    assert wrong.status_code == 422
    assert wrong.json()["connection"]["reason"].startswith("authentication failed: server said")
    folder = api.post(
        "/email-servers", {**body, "password": lab_user.password, "inbox_folder": "Eingang Ä"}
    )
    assert folder.status_code == 422
    assert folder.json()["connection"]["reason"] == "folder 'Eingang Ä' does not exist"
    assert api.get("/email-servers").json()["items"] == []


def test_enabled_save_that_connects_carries_the_result(api: ApiClient, smtp_lab: SmtpLab) -> None:
    response = api.post("/email-servers", lab_smtp(smtp_lab, enabled=True))
    assert response.status_code == 201, response.text
    connection = response.json()["connection"]
    assert connection["ok"] is True and connection["reason"] is None
    assert "STARTTLS" in connection["capabilities"]
    assert api.get(f"/email-servers/{response.json()['id']}").json()["connection"]["ok"] is True


def test_enabling_by_patch_tests_with_the_stored_settings(
    api: ApiClient, smtp_lab: SmtpLab
) -> None:
    port = closed_port()
    secret = smtp_lab.users[SMTP_LAB_USER]
    server = api.create(**smtp(port, password=secret))
    path = f"/email-servers/{server['id']}"
    refused = api.patch(path, {"enabled": True})
    assert refused.status_code == 422
    assert api.get(path).json()["enabled"] is False
    # Another port is another place: the password is typed again for it.
    enabled = api.patch(path, {"enabled": True, "port": smtp_lab.port, "password": secret})
    assert enabled.status_code == 200, enabled.text
    assert enabled.json()["enabled"] is True
    assert enabled.json()["connection"]["ok"] is True


def test_enabled_inbound_server_needs_a_routing_plan(
    api: ApiClient, dovecot: DovecotLab, lab_user: LabUser
) -> None:
    body = {
        "type": "imap",
        "name": "in",
        "host": "127.0.0.1",
        "sni_hostname": "localhost",
        "port": dovecot.imaps_port,
        "username": lab_user.name,
        "password": lab_user.password,
        "enabled": True,
    }
    response = api.post("/email-servers", body)
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "routing_plan_id"
    plan = api.routing_plan()
    saved = api.post("/email-servers", {**body, "routing_plan_id": plan})
    assert saved.status_code == 201, saved.text
    assert "IDLE" in saved.json()["connection"]["capabilities"]


def test_test_endpoint_probes_an_unsaved_server(api: ApiClient, smtp_lab: SmtpLab) -> None:
    ok = api.post("/email-servers/test", lab_smtp(smtp_lab))
    assert ok.status_code == 200
    assert ok.json()["ok"] is True and ok.json()["reason"] is None, ok.json()
    assert "AUTH=PLAIN" in ok.json()["capabilities"]
    refused = api.post("/email-servers/test", smtp(closed_port())).json()
    assert refused["ok"] is False and refused["reason"].startswith("connection refused")
    unresolvable = api.post(
        "/email-servers/test", {**smtp(25), "host": "no-such-host.invalid"}
    ).json()
    assert unresolvable["category"] == "dns"
    assert "no-such-host.invalid" in unresolvable["reason"]
    assert api.get("/email-servers").json()["items"] == []
    assert smtp_lab.count() == 0  # testing never sends


def test_test_endpoint_says_no_routing_plan_for_inbound(api: ApiClient) -> None:
    body = {"type": "pop3", "name": "in", "host": "127.0.0.1"}
    result = api.post("/email-servers/test", body).json()
    assert result == {**result, "ok": False, "reason": "no routing plan linked"}


def test_denied_networks_are_never_connected_to(api: ApiClient) -> None:
    """Link-local addresses (cloud metadata services) are refused by default."""
    result = api.post("/email-servers/test", {**smtp(80), "host": "169.254.169.254"}).json()
    assert result["ok"] is False
    assert result["reason"] == "connections to 169.254.169.254 are not allowed by this installation"


def test_a_password_under_a_lost_key_asks_for_the_password_again(
    api: ApiClient, pool: ConnectionPool[DictConnection], smtp_lab: SmtpLab
) -> None:
    server = api.create(**smtp(smtp_lab.port))
    with pool.connection() as conn:
        lost_key = SecretBox([Fernet.generate_key().decode()]).encrypt("unknown")
        conn.execute("UPDATE email_servers SET password_encrypted = %s", (lost_key,))
    answer = api.patch(f"/email-servers/{server['id']}", {"enabled": True})
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["field"] == "password"
    assert "enter the password again" in answer.json()["detail"][0]["msg"]
