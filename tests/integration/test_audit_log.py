"""Every change is recorded: who, when, which fields — never a value, never a secret."""

from __future__ import annotations

from psycopg_pool import ConnectionPool

from shared.db import audit
from shared.db.pool import DictConnection
from tests.support.api import ApiClient
from tests.support.leaks import SECRET_MARKER, password


def test_create_update_duplicate_delete_are_audited(
    api: ApiClient, pool: ConnectionPool[DictConnection]
) -> None:
    server = api.create(type="pop3", name="p", host="pop.example.com", password=password("a"))
    api.patch(f"/email-servers/{server['id']}", {"password": password("b"), "description": "d"})
    copy = api.post(f"/email-servers/{server['id']}/duplicate").json()
    api.delete(f"/email-servers/{server['id']}")
    with pool.connection() as conn:
        entries = audit.entries(conn, "acme")
    summary = [(e["action"], e["object_id"]) for e in entries]
    assert summary == [
        ("create", server["id"]),
        ("update", server["id"]),
        ("duplicate", copy["id"]),
        ("delete", server["id"]),
    ]
    assert all(e["actor"] == "tester" and e["at"] is not None for e in entries)
    assert set(entries[1]["fields"]) == {"password", "description"}
    assert "password" in entries[0]["fields"]
    assert not any(SECRET_MARKER in str(entry) for entry in entries)
