"""The operator's ``mailroom`` command (CONTRACT.md, "Running it")."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx2

from shared.db.migrate import current_revision, head_revision
from shared.settings import Settings
from tests.support.processes import MAILROOM, ServiceProcess
from tests.support.tcp import closed_port


def mailroom(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MAILROOM, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )


def test_token_prints_only_the_token_on_stdout() -> None:
    result = mailroom("token", "--tenant", "acme", "--permission", "email_servers:read")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert result.stdout == token + "\n"
    assert token.count(".") == 2  # a signed JWT; a running API accepting it is tested below


def test_unknown_permission_is_refused() -> None:
    result = mailroom("token", "--tenant", "acme", "--permission", "root")
    assert result.returncode == 2
    assert "unknown permission" in result.stderr


def test_migrate_is_idempotent(settings: Settings) -> None:
    for _ in range(2):
        result = mailroom("migrate")
        assert result.returncode == 0, result.stderr
        assert f"database schema at revision {head_revision()}" in result.stdout
    assert current_revision(settings.database_url) == head_revision()


def test_config_api_process_serves_health_openapi_metrics_and_tokens() -> None:
    port = closed_port()
    api = ServiceProcess("run", "config-api", env={"MAILROOM_API_PORT": str(port)})
    try:
        api.wait_for_log("Uvicorn running", timeout=20)
        base = f"http://127.0.0.1:{port}"
        assert httpx2.get(f"{base}/healthz").json() == {"status": "ok"}
        assert "/api/v1/email-servers" in httpx2.get(f"{base}/openapi.json").json()["paths"]
        assert "python_info" in httpx2.get(f"{base}/metrics").text
        token = mailroom("token", "--tenant", "acme", "--permission", "email_servers:read")
        listed = httpx2.get(
            f"{base}/api/v1/email-servers",
            headers={"Authorization": f"Bearer {token.stdout.strip()}"},
        )
        assert listed.status_code == 200
        assert httpx2.get(f"{base}/api/v1/email-servers").status_code == 401
        # Uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status tells why.
        assert api.terminate() in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in api.log()
    finally:
        api.kill()


def test_a_missing_dependency_is_named_with_how_to_start_it() -> None:
    dead = closed_port()
    env = {
        "MAILROOM_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{dead}/mailroom",
        "MAILROOM_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{dead}/%2F",
    }
    started = time.monotonic()
    for service in ("config-api", "fetcher"):
        result = mailroom("run", service, env=env)
        assert result.returncode == 2
        assert f"PostgreSQL does not answer at 127.0.0.1:{dead}" in result.stderr
        assert f"RabbitMQ does not answer at 127.0.0.1:{dead}" in result.stderr
        assert "pg_ctlcluster" in result.stderr and "rabbitmq-server" in result.stderr
        assert "Traceback" not in result.stderr + result.stdout
        assert "guest:guest" not in result.stderr  # credentials in URLs are not echoed
    assert time.monotonic() - started < 30
    migrate = mailroom("migrate", env=env)
    assert migrate.returncode == 2 and "PostgreSQL does not answer" in migrate.stderr


def test_a_service_refuses_an_unmigrated_database() -> None:
    env = {"MAILROOM_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/mailroom_never_migrated"}
    result = mailroom("run", "sender", env=env)
    assert result.returncode == 2
    assert "run  mailroom migrate" in result.stderr
    assert "Traceback" not in result.stderr


def test_without_keys_a_service_refuses_to_start_instead_of_inventing_them(tmp_path: Path) -> None:
    env = {
        "MAILROOM_SECRET_KEYS": "",
        "MAILROOM_TOKEN_SIGNING_KEY": "",
        "MAILROOM_STATE_DIR": str(tmp_path),
    }
    for args in (
        ("run", "config-api"),
        ("run", "fetcher"),
        ("token", "--tenant", "t", "--permission", "email_servers:read"),
    ):
        result = mailroom(*args, env=env)
        assert result.returncode == 2, args
        assert "MAILROOM_SECRET_KEYS and MAILROOM_TOKEN_SIGNING_KEY are not set" in result.stderr
        assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # no keys were made up


def test_encrypt_secret_reads_stdin_and_prints_what_the_installation_decrypts(
    settings: Settings,
) -> None:
    from shared.secrets import SecretBox
    from tests.support.leaks import password

    secret = password("client-secret")
    done = subprocess.run(
        [MAILROOM, "encrypt-secret"],
        input=secret + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert secret not in done.stdout + done.stderr
    assert SecretBox.from_settings(settings).decrypt(token.encode()) == secret


def test_a_bad_oauth_provider_setting_stops_a_service_with_a_message() -> None:
    done = mailroom("run", "fetcher", env={"MAILROOM_OAUTH_PROVIDERS": '[{"name": "corp"}]'})
    assert done.returncode == 2
    assert "MAILROOM_OAUTH_PROVIDERS[0] (corp): missing authorize_url" in done.stderr
    assert "Traceback" not in done.stderr
