"""The status service as a client sees it: its status API and its health."""

from __future__ import annotations

import time
from typing import Any

import httpx2

from shared.settings import Settings
from shared.tokens import READ
from tests.support.api import token_for


class StatusApi:
    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {token}"}

    def items(self) -> list[dict[str, Any]]:
        answer = httpx2.get(f"{self.url}/api/v1/status/email-servers", headers=self.headers)
        assert answer.status_code == 200, answer.text
        items: list[dict[str, Any]] = answer.json()["items"]
        return items

    def of(self, server_id: str) -> dict[str, Any] | None:
        return next((i for i in self.items() if i["server_id"] == server_id), None)

    def wait_state(
        self, server_id: str, state: str, timeout: float
    ) -> tuple[float, dict[str, Any]]:
        started = time.monotonic()
        while True:
            item = self.of(server_id)
            if item is not None and item["state"] == state:
                return time.monotonic() - started, item
            if time.monotonic() - started > timeout:
                raise AssertionError(f"never {state} within {timeout} s; last: {item}")
            time.sleep(0.05)


def reader(status_url: str, settings: Settings, tenant: str) -> StatusApi:
    return StatusApi(status_url, token_for(settings, tenant, [READ]))


def healthy(url: str) -> bool:
    try:
        return httpx2.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx2.HTTPError:
        return False
