"""Tokens name the tenant and permissions: 401 without, 403 without permission, 404 across."""

from __future__ import annotations

from collections.abc import Callable

import httpx2
import pytest
from fastapi.testclient import TestClient

from shared.settings import Settings
from shared.tokens import MANAGE, READ, mint_token
from tests.support.api import ApiClient, token_for


@pytest.fixture
def reader(client: TestClient, settings: Settings) -> ApiClient:
    return ApiClient(client, token_for(settings, "acme", [READ]))


def test_no_token_or_a_bad_one_answers_401(client: TestClient, settings: Settings) -> None:
    anonymous = ApiClient(client, None)
    assert anonymous.get("/email-servers").status_code == 401
    forged = mint_token(
        "another-key" * 4, tenant_id="acme", permissions=[MANAGE], subject="x", ttl_seconds=60
    )
    assert ApiClient(client, forged).get("/email-servers").status_code == 401
    assert ApiClient(client, "not.a.token").get("/email-servers").status_code == 401
    expired = token_for(settings, "acme", [MANAGE], ttl=-10)
    response = ApiClient(client, expired).get("/email-servers")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_token_without_a_mail_permission_answers_403(
    client: TestClient, settings: Settings
) -> None:
    nobody = ApiClient(client, token_for(settings, "acme", ["reports:read"]))
    assert nobody.get("/email-servers").status_code == 403
    assert nobody.get("/routing-plans").status_code == 403
    assert nobody.get("/template-server").status_code == 403


def test_read_permission_reads_but_cannot_write(api: ApiClient, reader: ApiClient) -> None:
    server = api.create(type="smtp", name="a", host="smtp.example.com")
    path = f"/email-servers/{server['id']}"
    assert reader.get("/email-servers").status_code == 200
    assert reader.get(path).status_code == 200
    assert reader.get("/template-server").status_code == 200
    assert reader.get("/routing-plans").status_code == 200
    writes: list[Callable[[], httpx2.Response]] = [
        lambda: reader.post("/email-servers", {"type": "smtp", "name": "b", "host": "h.de"}),
        lambda: reader.patch(path, {"name": "changed"}),
        lambda: reader.delete(path),
        lambda: reader.post(f"{path}/duplicate"),
        lambda: reader.post("/email-servers/test", {"type": "smtp", "name": "b", "host": "h.de"}),
        lambda: reader.put("/template-server", {"server_id": server["id"]}),
        lambda: reader.post("/routing-plans", {"name": "x"}),
    ]
    for write in writes:
        response = write()
        assert response.status_code == 403
    assert api.get(path).json() == server
    assert len(api.get("/email-servers").json()["items"]) == 1


def test_another_tenants_servers_are_invisible_and_untouchable(
    api: ApiClient, other_api: ApiClient
) -> None:
    theirs = other_api.create(type="smtp", name="globex out", host="smtp.globex.test")
    path = f"/email-servers/{theirs['id']}"
    assert api.get("/email-servers").json()["items"] == []
    assert api.get(path).status_code == 404
    assert api.patch(path, {"name": "mine now"}).status_code == 404
    assert api.delete(path).status_code == 404
    assert api.post(f"{path}/duplicate").status_code == 404
    assert api.get("/email-servers").json()["items"] == []
    assert other_api.get(path).json() == theirs


def test_another_tenants_routing_plan_cannot_be_linked(
    api: ApiClient, other_api: ApiClient
) -> None:
    their_plan = other_api.routing_plan("Globex support")
    response = api.post(
        "/email-servers",
        {"type": "imap", "name": "n", "host": "imap.example.com", "routing_plan_id": their_plan},
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "routing_plan_id"
    assert api.get("/routing-plans").json()["items"] == []
