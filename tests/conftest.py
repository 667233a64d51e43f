"""Fixtures for the whole suite. Real PostgreSQL, RabbitMQ and Redis; none of them optional.

A missing service fails the run loudly (never a skip): ``make test`` starts them first.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from tests.support import environment

environment.install()

from fastapi.testclient import TestClient  # noqa: E402
from psycopg_pool import ConnectionPool  # noqa: E402

from services.config_api.app import create_app  # noqa: E402
from shared.db.migrate import migrate  # noqa: E402
from shared.db.pool import DictConnection, make_pool  # noqa: E402
from shared.preflight import problems  # noqa: E402
from shared.settings import Settings  # noqa: E402
from tests.lab.certs import LabCertificates  # noqa: E402
from tests.lab.fixtures import (  # noqa: E402, F401 - fixtures for every test module
    dovecot,
    lab_user,
    mail_lab_certs,
    oauth_lab,
    smtp_default_lab,
    smtp_lab,
)
from tests.support import rabbit  # noqa: E402
from tests.support.api import RESPONSES, ApiClient, admin  # noqa: E402
from tests.support.leaks import LeakWatch  # noqa: E402
from tests.support.oauth import (  # noqa: E402, F401 - fixtures for every test module
    oauth_admin,
    oauth_client,
    oauth_tenant,
    settings_with_lab,
)
from tests.support.processes import LOG_FILES  # noqa: E402
from tests.support.sender import (  # noqa: E402, F401 - fixtures for every test module
    results,
    smtp_connections,
)


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings()


@pytest.fixture(scope="session", autouse=True)
def infrastructure(settings: Settings) -> None:
    found = problems(
        settings.model_copy(update={"amqp_url": "amqp://guest:guest@127.0.0.1:5672/%2F"})
    )
    if found:
        pytest.exit("the test suite needs these services:\n" + "\n".join(found), returncode=3)
    rabbit.ensure_vhost()
    migrate(settings.database_url)


@pytest.fixture(scope="session", autouse=True)
def secret_leak_watch(infrastructure: None, settings: Settings) -> Iterator[LeakWatch]:
    """Every log line, API answer and config event of the session; none may hold a password.

    The check runs when the session ends, after every test: a leak fails the run.
    """
    watch = LeakWatch()
    root = logging.getLogger()
    root.addHandler(watch)
    root.setLevel(logging.DEBUG)
    logging.getLogger("pika").setLevel(logging.WARNING)
    tap = rabbit.EventTap(settings.amqp_url, "mailroom.config").start()
    yield watch
    tap.stop()
    root.removeHandler(watch)
    watch.answers.extend(RESPONSES)
    watch.logs.extend(f.read_text(errors="replace") for f in LOG_FILES if f.exists())
    watch.events.extend(r.raw for r in tap.snapshot())
    leaks = watch.leaks()
    assert not leaks, "passwords leaked:\n" + "\n".join(leaks)


@pytest.fixture(scope="session")
def pool(infrastructure: None, settings: Settings) -> Iterator[ConnectionPool[DictConnection]]:
    db = make_pool(settings, max_size=5)
    yield db
    db.close()


@pytest.fixture(autouse=True)
def clean_database(pool: ConnectionPool[DictConnection]) -> None:
    with pool.connection() as conn:
        conn.execute(
            "TRUNCATE email_servers, routing_plans, audit_log, outbox, inbound_messages,"
            " send_requests"
            " RESTART IDENTITY CASCADE"
        )


@pytest.fixture(scope="session")
def client(
    infrastructure: None, settings: Settings, request: pytest.FixtureRequest
) -> Iterator[TestClient]:
    """The config API in-process, its outbox relay running against the test vhost.

    Its connection test trusts the mail lab's CA, as an operator's MAILROOM_CA_BUNDLE would.
    """
    certs: LabCertificates = request.getfixturevalue("mail_lab_certs")
    api_settings = settings.model_copy(update={"ca_bundle": certs.ca})
    with TestClient(create_app(api_settings)) as test_client:
        yield test_client


@pytest.fixture
def api(client: TestClient, settings: Settings) -> ApiClient:
    """Tenant ``acme``'s admin (``email_servers:manage``)."""
    return admin(client, settings, "acme")


@pytest.fixture
def config_events(settings: Settings) -> Iterator[rabbit.EventTap]:
    tap = rabbit.EventTap(settings.amqp_url, "mailroom.config").start()
    yield tap
    tap.stop()


@pytest.fixture
def other_api(client: TestClient, settings: Settings) -> ApiClient:
    """Tenant ``globex``'s admin: another company on the same installation."""
    return admin(client, settings, "globex")
