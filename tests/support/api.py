"""A client for the config API as a tenant admin would use it, recording every answer.

Each answer's body is kept so that the suite can prove, at its end, that no password was
ever returned.
"""

from __future__ import annotations

from typing import Any

import httpx2
from fastapi.testclient import TestClient

from shared.settings import Settings
from shared.tokens import MANAGE, mint_token

RESPONSES: list[str] = []  # every body any ApiClient received in this test session


def token_for(
    settings: Settings, tenant: str, permissions: list[str], subject: str = "tester", ttl: int = 600
) -> str:
    return mint_token(
        settings.token_key,
        tenant_id=tenant,
        permissions=permissions,
        subject=subject,
        ttl_seconds=ttl,
    )


class ApiClient:
    """Calls ``/api/v1`` with one tenant's token."""

    def __init__(self, client: TestClient, token: str | None) -> None:
        self._client = client
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    def request(self, method: str, path: str, **kwargs: Any) -> httpx2.Response:
        headers = {**self._headers, **kwargs.pop("headers", {})}
        ops_paths = ("/healthz", "/metrics", "/openapi.json", "/docs")
        url = path if path.startswith(ops_paths) else f"/api/v1{path}"
        response: httpx2.Response = self._client.request(method, url, headers=headers, **kwargs)
        RESPONSES.append(response.text)
        for value in response.headers.values():
            RESPONSES.append(value)
        return response

    def get(self, path: str, **kwargs: Any) -> httpx2.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, json: Any = None, **kwargs: Any) -> httpx2.Response:
        return self.request("POST", path, json=json, **kwargs)

    def patch(self, path: str, json: Any = None, **kwargs: Any) -> httpx2.Response:
        return self.request("PATCH", path, json=json, **kwargs)

    def put(self, path: str, json: Any = None, **kwargs: Any) -> httpx2.Response:
        return self.request("PUT", path, json=json, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> httpx2.Response:
        return self.request("DELETE", path, **kwargs)

    # --- shortcuts for setting up a scene --------------------------------------------------

    def routing_plan(self, name: str = "Support") -> str:
        response = self.post("/routing-plans", {"name": name})
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def create(self, **fields: Any) -> dict[str, Any]:
        response = self.post("/email-servers", fields)
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body


def admin(client: TestClient, settings: Settings, tenant: str = "acme") -> ApiClient:
    return ApiClient(client, token_for(settings, tenant, [MANAGE]))
