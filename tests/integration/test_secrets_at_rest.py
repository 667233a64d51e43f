"""Passwords are encrypted at rest under a key from the settings, and keys can be rotated."""

from __future__ import annotations

import os
import subprocess

from cryptography.fernet import Fernet
from psycopg_pool import ConnectionPool

from shared.db import email_servers
from shared.db.pool import DictConnection
from shared.secrets import SecretBox
from shared.settings import Settings
from tests.support.api import ApiClient
from tests.support.leaks import password


def stored_password(pool: ConnectionPool[DictConnection], server_id: str) -> bytes:
    with pool.connection() as conn:
        server = email_servers.get(conn, server_id)
    assert server is not None and server.password_encrypted is not None
    return server.password_encrypted


def test_password_is_stored_encrypted(
    api: ApiClient, pool: ConnectionPool[DictConnection], settings: Settings
) -> None:
    secret = password("rest")
    server = api.create(type="imap", name="n", host="imap.example.com", password=secret)
    token = stored_password(pool, server["id"])
    assert secret.encode() not in token
    assert SecretBox.from_settings(settings).decrypt(token) == secret


def test_rotate_keys_reencrypts_every_secret_under_the_new_key(
    api: ApiClient, pool: ConnectionPool[DictConnection], settings: Settings
) -> None:
    secrets = {
        api.create(type="pop3", name=f"p{i}", host="pop.example.com", password=password(str(i)))[
            "id"
        ]: password(str(i))
        for i in range(3)
    }
    old_key = settings.fernet_keys[0]
    new_key = Fernet.generate_key().decode()
    env = {**os.environ, "MAILROOM_SECRET_KEYS": f"{new_key},{old_key}"}
    result = subprocess.run(
        [".venv/bin/mailroom", "rotate-keys"], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "re-encrypted 3 secrets" in result.stdout
    only_new = SecretBox([new_key])
    for server_id, secret in secrets.items():
        assert only_new.decrypt(stored_password(pool, server_id)) == secret
    # Rotation does not count as a change: versions stay, so no config event storm.
    versions = {s["id"]: s["version"] for s in api.get("/email-servers").json()["items"]}
    assert set(versions.values()) == {1}
