"""OAuth2 tokens between several workers, and the warnings an admin gets before a consent
ends; against the lab's authorization server, PostgreSQL and Redis."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx2
import pytest
from fastapi.testclient import TestClient
from psycopg_pool import ConnectionPool

from services.config_api.app import create_app
from shared.db import email_servers as servers_repo
from shared.db.pool import DictConnection
from shared.email_servers import EmailServer
from shared.oauth.tokens import OAuthTokens
from shared.secrets import SecretBox
from shared.settings import Settings
from shared.tokens import READ
from tests.lab.dovecot import DovecotLab, LabUser, free_port
from tests.lab.oauth_server import OAuthLab
from tests.support.api import ApiClient, admin, token_for
from tests.support.oauth import PROVIDER, give_consent, imap_server, stored_tokens
from tests.support.processes import ServiceProcess

WORKERS = 6


def stored_server(pool: ConnectionPool[DictConnection], server_id: str) -> EmailServer:
    with pool.connection() as conn:
        server = servers_repo.get(conn, server_id)
    assert server is not None
    return server


def tokens_of_a_worker(settings: Settings, pool: ConnectionPool[DictConnection]) -> OAuthTokens:
    """What one fetcher or sender process holds: its own Redis connection, nothing shared."""
    return OAuthTokens.from_settings(settings, pool, SecretBox.from_settings(settings))


@pytest.fixture
def consented_server(
    oauth_admin: ApiClient,
    oauth_client: TestClient,
    dovecot: DovecotLab,
    lab_user: LabUser,
    oauth_lab: OAuthLab,
) -> Iterator[str]:
    oauth_lab.set_token_lifetime(2)
    server = imap_server(oauth_admin, dovecot, lab_user, enabled=False)
    assert give_consent(oauth_client, server["authorization_url"])["ok"] is True
    yield str(server["id"])
    oauth_lab.reset()


def test_workers_needing_a_fresh_token_at_once_refresh_it_once(
    settings_with_lab: Settings,
    pool: ConnectionPool[DictConnection],
    consented_server: str,
    lab_user: LabUser,
    oauth_lab: OAuthLab,
) -> None:
    server = stored_server(pool, consented_server)
    before, _ = stored_tokens(pool, settings_with_lab, server.id)
    time.sleep(2.2)  # expired: every worker's next login needs a new token
    workers = [tokens_of_a_worker(settings_with_lab, pool) for _ in range(WORKERS)]
    start = threading.Barrier(WORKERS)
    got: list[str] = []

    def login(tokens: OAuthTokens) -> None:
        start.wait()
        got.append(tokens.access_token(server))

    threads = [threading.Thread(target=login, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert len(got) == WORKERS
    same, fresh = len(set(got)) == 1, got[0] != before  # (no token in a failure message)
    assert same, "workers got different tokens"
    assert fresh, "the expired token was handed out"
    # One refresh for all: the lab rotates refresh tokens, so a second one would also fail.
    assert oauth_lab.grants(lab_user.name) == {
        "authorization_code": 1,
        "refresh_token": 1,
        "refused": 0,
    }
    stored_tokens(pool, settings_with_lab, server.id)


def test_a_token_the_mail_server_refused_is_refreshed_before_the_next_login(
    settings_with_lab: Settings,
    pool: ConnectionPool[DictConnection],
    consented_server: str,
    lab_user: LabUser,
    oauth_lab: OAuthLab,
) -> None:
    server = stored_server(pool, consented_server)
    tokens = tokens_of_a_worker(settings_with_lab, pool)
    tokens.access_token(server)  # still valid: no refresh
    tokens.rejected(server)  # a token younger than a minute is not refreshed again
    tokens.access_token(server)
    assert oauth_lab.grants(lab_user.name)["refresh_token"] == 0
    with pool.connection() as conn:
        conn.execute(
            "UPDATE oauth_tokens SET consented_at = now() - interval '2 minutes'"
            " WHERE server_id = %s",
            (server.id,),
        )
    tokens.rejected(server)
    tokens.access_token(server)
    # (Tokens are compared by count, not value: an RS256 token signed twice in the same second
    # with the same claims is the same string.)
    assert oauth_lab.grants(lab_user.name)["refresh_token"] == 1
    stored_tokens(pool, settings_with_lab, server.id)


def test_warnings_before_the_refresh_token_or_the_client_secret_ends(
    settings_with_lab: Settings,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
    dovecot: DovecotLab,
    lab_user: LabUser,
) -> None:
    entry = json.loads(settings_with_lab.oauth_providers)[0]
    secret_ends = (datetime.now(UTC) + timedelta(days=5)).date().isoformat()
    entry.update(client_secret_expires_at=secret_ends, refresh_token_lifetime_days=10)
    providers = json.dumps([entry])
    expiring = settings_with_lab.model_copy(update={"oauth_providers": providers})
    tenant = "oauth-warnings"
    with TestClient(create_app(expiring)) as client:
        api = admin(client, settings, tenant)
        server = imap_server(api, dovecot, lab_user, enabled=False)
        assert give_consent(client, server["authorization_url"])["ok"] is True
        shown = api.get(f"/email-servers/{server['id']}").json()
    oauth = shown["oauth"]
    assert oauth["state"] == "ok" and oauth["refresh_token_age_days"] < 1
    assert oauth["client_secret_expires_at"].startswith(secret_ends)
    assert oauth["refresh_token_expires_at"] is not None
    warnings = " ".join(shown["warnings"])
    assert f"client secret of provider {PROVIDER} expires on {secret_ends}" in warnings
    assert "refresh token is 0 days old" in warnings

    # The status service shows the same, for ops dashboards.
    port = free_port()
    env = {"MAILROOM_OAUTH_PROVIDERS": providers, "MAILROOM_STATUS_PORT": str(port)}
    status = ServiceProcess("run", "status", env=env)
    try:
        status.wait_for_log("Uvicorn running", timeout=20)
        headers = {"Authorization": f"Bearer {token_for(settings, tenant, [READ])}"}
        url = f"http://127.0.0.1:{port}/api/v1/status/email-servers/{server['id']}"
        deadline = time.monotonic() + 10
        while (answer := httpx2.get(url, headers=headers)).status_code != 200:
            assert time.monotonic() < deadline, answer.text
            time.sleep(0.1)
        item = answer.json()
        assert item["oauth"]["state"] == "ok"
        assert item["oauth"]["client_secret_expires_at"].startswith(secret_ends)
        assert any("client secret" in w for w in item["oauth_warnings"])
    finally:
        status.terminate()
    stored_tokens(pool, settings_with_lab, server["id"])
