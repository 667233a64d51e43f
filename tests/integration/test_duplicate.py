"""Duplicate: a disabled copy with the same settings and secrets, named as a copy."""

from __future__ import annotations

from psycopg_pool import ConnectionPool

from shared.db import email_servers
from shared.db.pool import DictConnection
from shared.secrets import SecretBox
from shared.settings import Settings
from tests.lab.fixtures import SMTP_LAB_USER
from tests.lab.smtp_server import SmtpLab
from tests.support.api import ApiClient


def test_duplicate_copies_settings_and_secret_but_is_disabled(
    api: ApiClient, pool: ConnectionPool[DictConnection], settings: Settings, smtp_lab: SmtpLab
) -> None:
    secret = smtp_lab.users[SMTP_LAB_USER]
    settings_ = {
        "type": "smtp",
        "description": "Antworten an Kunden",
        "host": "localhost",
        "tls": False,
        "port": smtp_lab.port,
        "username": SMTP_LAB_USER,
        "sender_addresses": ["noreply@example.com"],
        "role": "agent",
    }
    original = api.create(
        name="Ausgang", **settings_, password=secret, enabled=True, is_template_server=True
    )
    response = api.post(f"/email-servers/{original['id']}/duplicate")
    assert response.status_code == 201, response.text
    copy = response.json()
    assert copy["id"] != original["id"]
    assert copy["name"] == "Ausgang (copy)"
    assert copy["enabled"] is False
    assert copy["is_template_server"] is False
    assert copy["has_password"] is True
    for field in (*settings_, "effective_port"):
        assert copy[field] == original[field], field
    with pool.connection() as conn:
        stored = email_servers.get(conn, copy["id"])
    assert stored is not None and stored.password_encrypted is not None
    assert SecretBox.from_settings(settings).decrypt(stored.password_encrypted) == secret
    assert api.get("/template-server").json() == {"server_id": original["id"]}


def test_copy_name_stays_within_200_characters(api: ApiClient) -> None:
    original = api.create(type="imap", name="ä" * 200, host="imap.example.com")
    copy = api.post(f"/email-servers/{original['id']}/duplicate").json()
    assert len(copy["name"]) == 200
    assert copy["name"].endswith(" (copy)")
