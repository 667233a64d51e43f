"""Helpers for OAuth2 tests: the config API configured with the lab's provider, an admin's
browser going through the consent, and the tokens Mailroom stored (for the leak check)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx2
import pytest
from fastapi.testclient import TestClient
from psycopg_pool import ConnectionPool

from services.config_api.app import create_app
from shared.db import oauth as oauth_repo
from shared.db.pool import DictConnection
from shared.secrets import SecretBox
from shared.settings import Settings
from tests.lab.certs import LabCertificates
from tests.lab.dovecot import DovecotLab, LabUser
from tests.lab.oauth_server import OAuthLab
from tests.support.api import ApiClient, admin
from tests.support.leaks import OTHER_SECRETS

PROVIDER = "lab"


def oauth_settings(settings: Settings, certs: LabCertificates, lab: OAuthLab) -> Settings:
    """The lab as the operator would configure it: its client secret encrypted."""
    entry = lab.provider_json(PROVIDER)
    secret = str(entry.pop("client_secret"))
    entry["client_secret_encrypted"] = SecretBox.from_settings(settings).encrypt(secret).decode()
    return settings.model_copy(
        update={"ca_bundle": certs.ca, "oauth_providers": json.dumps([entry])}
    )


@pytest.fixture(scope="module")
def settings_with_lab(
    settings: Settings, mail_lab_certs: LabCertificates, oauth_lab: OAuthLab
) -> Settings:
    return oauth_settings(settings, mail_lab_certs, oauth_lab)


@pytest.fixture(scope="module")
def oauth_client(settings_with_lab: Settings) -> Iterator[TestClient]:
    """The config API with the lab's provider configured."""
    with TestClient(create_app(settings_with_lab)) as client:
        yield client


@pytest.fixture
def oauth_tenant() -> str:
    return f"oauth-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def oauth_admin(oauth_client: TestClient, settings: Settings, oauth_tenant: str) -> ApiClient:
    return admin(oauth_client, settings, oauth_tenant)


def imap_server(api: ApiClient, lab: DovecotLab, user: LabUser, **fields: Any) -> dict[str, Any]:
    body = {
        "type": "imap",
        "name": f"oauth {user.name}",
        "host": "localhost",
        "port": lab.imaps_port,
        "tls": True,
        "auth_type": "oauth2",
        "oauth_provider": PROVIDER,
        "username": user.name,
        "routing_plan_id": api.routing_plan(f"plan {user.name}"),
        "enabled": True,
        **fields,
    }
    return api.create(**body)


def oauth_env(settings: Settings) -> dict[str, str]:
    """The same provider for a service started as a process."""
    return {"MAILROOM_OAUTH_PROVIDERS": settings.oauth_providers}


def give_consent(client: TestClient, authorization_url: str) -> dict[str, Any]:
    """What the admin's browser does: open the provider's page (the lab consents at once),
    follow its redirect to Mailroom's callback; the callback's JSON answer."""
    at_provider = httpx2.get(authorization_url, timeout=10, trust_env=False)
    assert at_provider.status_code in (302, 303), at_provider.text
    back = urlsplit(at_provider.headers["location"])
    assert back.path == "/api/v1/oauth/callback", back
    answer = client.get(
        back.path, params=parse_qs(back.query), headers={"Accept": "application/json"}
    )
    body: dict[str, Any] = answer.json()
    body["status_code"] = answer.status_code
    return body


def stored_tokens(
    pool: ConnectionPool[DictConnection], settings: Settings, server_id: str
) -> tuple[str, str | None]:
    """The access and refresh token stored for a server, decrypted; both join the leak check."""
    with pool.connection() as conn:
        stored = oauth_repo.get(conn, server_id)
    assert stored is not None, "no tokens stored"
    box = SecretBox.from_settings(settings)
    access = box.decrypt(stored.access_token_encrypted)
    refresh = (
        box.decrypt(stored.refresh_token_encrypted) if stored.refresh_token_encrypted else None
    )
    OTHER_SECRETS.update(t for t in (access, refresh) if t)
    return access, refresh
