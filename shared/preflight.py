"""Checks that RabbitMQ, PostgreSQL and Redis answer, with advice instead of a stack trace.

Every ``mailroom`` command that needs them calls :func:`require` first; an operator who forgot
to start one is told which one, where it was looked for, and how to start it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import psycopg
import redis
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from shared.broker import broker_connection
from shared.settings import KeysMissing, Settings

TIMEOUT_SECONDS = 3


@dataclass(frozen=True)
class Dependency:
    name: str
    setting: str
    how_to_start: str
    compose_service: str
    address: Callable[[Settings], str]
    check: Callable[[Settings], None]


class DependencyUnavailable(Exception):
    pass


def _url_address(url: str, default_port: int) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or default_port}"


def _pg_address(settings: Settings) -> str:
    params = conninfo_to_dict(settings.database_url)
    return f"{params.get('host', 'localhost')}:{params.get('port', 5432)}"


def _check_postgres(settings: Settings) -> None:
    # The server, not the database: ``mailroom migrate`` creates the database when missing.
    url = make_conninfo(settings.database_url, dbname="postgres")
    with psycopg.connect(url, connect_timeout=TIMEOUT_SECONDS):
        pass


def _check_rabbitmq(settings: Settings) -> None:
    with broker_connection(settings.amqp_url, connect_timeout=TIMEOUT_SECONDS) as conn:
        conn.connect()


def _check_redis(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=TIMEOUT_SECONDS)
    try:
        client.ping()
    finally:
        client.close()


POSTGRES = Dependency(
    "PostgreSQL",
    "MAILROOM_DATABASE_URL",
    "pg_ctlcluster $(ls /etc/postgresql) main start   (Debian package: postgresql)",
    "postgres",
    _pg_address,
    _check_postgres,
)
RABBITMQ = Dependency(
    "RabbitMQ",
    "MAILROOM_AMQP_URL",
    "rabbitmq-server -detached   (Debian package: rabbitmq-server)",
    "rabbitmq",
    lambda s: _url_address(s.amqp_url, 5672),
    _check_rabbitmq,
)
REDIS = Dependency(
    "Redis",
    "MAILROOM_REDIS_URL",
    "redis-server --daemonize yes --bind 127.0.0.1   (Debian package: redis-server)",
    "redis",
    lambda s: _url_address(s.redis_url, 6379),
    _check_redis,
)
ALL = (POSTGRES, RABBITMQ, REDIS)


def problems(settings: Settings, dependencies: tuple[Dependency, ...] = ALL) -> list[str]:
    found = []
    for dep in dependencies:
        try:
            dep.check(settings)
        except Exception as exc:  # noqa: BLE001 - any failure means "does not answer"; we report it
            found.append(
                f"{dep.name} does not answer at {dep.address(settings)} ({dep.setting}): "
                f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}\n"
                f"    start it with:  {dep.how_to_start}\n"
                f"    or as a container:  docker compose -f deploy/compose.yaml up -d "
                f"{dep.compose_service}   (see deploy/README.md)"
            )
    return found


def require(settings: Settings, dependencies: tuple[Dependency, ...] = ALL) -> None:
    """Raise :class:`DependencyUnavailable` naming every dependency that does not answer.

    When PostgreSQL is among them, its schema must also be at the newest migration: a service
    started against an old schema would fail on its first query instead of saying why.
    """
    try:
        settings.check_keys()
    except KeysMissing as exc:
        raise DependencyUnavailable(str(exc)) from exc
    found = problems(settings, dependencies)
    if found:
        raise DependencyUnavailable("\n".join(found))
    if POSTGRES in dependencies:
        _require_current_schema(settings)


def _require_current_schema(settings: Settings) -> None:
    from sqlalchemy.exc import SQLAlchemyError

    from shared.db.migrate import current_revision, head_revision

    try:
        current = current_revision(settings.database_url)
    except SQLAlchemyError:
        current = None  # the database itself is missing
    head = head_revision()
    if current != head:
        raise DependencyUnavailable(
            f"the database schema is at revision {current or 'none'}, this version needs "
            f"{head}: run  mailroom migrate  (make run does it for you)"
        )
