"""Connections to the Mailroom database."""

from __future__ import annotations

from typing import Any, cast

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from shared.settings import Settings

DictConnection = psycopg.Connection[dict[str, Any]]

# A session whose other end vanished without a word (a network partition, a host that died) is
# noticed within about a minute at both ends instead of the kernel's two hours: the server then
# ends it and releases its advisory locks (the outbox relay's leadership, a send request being
# delivered), which another process is waiting for, and the client fails instead of hanging.
KEEPALIVE_SECONDS = {"idle": 30, "interval": 10, "count": 3}


def session_options(database_url: str) -> dict[str, Any]:
    """Connection parameters for every long-lived session: TCP keepalives on the client's
    side (libpq) and on the server's (its ``tcp_keepalives_*`` settings, set per session)."""
    server_side = " ".join(f"-c tcp_keepalives_{k}={v}" for k, v in KEEPALIVE_SECONDS.items())
    configured = conninfo_to_dict(database_url).get("options")
    return {
        "keepalives": 1,
        **{f"keepalives_{k}": v for k, v in KEEPALIVE_SECONDS.items()},
        "options": f"{configured} {server_side}" if configured else server_side,
    }


def make_pool(
    settings: Settings, *, min_size: int = 1, max_size: int = 10
) -> ConnectionPool[DictConnection]:
    """A pool whose connections return rows as dicts; opened and checked before returning."""
    pool: ConnectionPool[DictConnection] = ConnectionPool(
        settings.database_url,
        min_size=min_size,
        max_size=max_size,
        connection_class=cast(type[DictConnection], psycopg.Connection),
        kwargs={"row_factory": dict_row, **session_options(settings.database_url)},
        open=False,
        name="mailroom",
    )
    pool.open(wait=True, timeout=10)
    return pool


def ensure_database(database_url: str) -> bool:
    """Create the database named in the URL when it is missing; True when it was created.

    The running system and the test suite each use their own database (``mailroom`` and
    ``mailroom_test``), so that a test run never touches what ``make run`` keeps.
    """
    params = conninfo_to_dict(database_url)
    name = str(params.get("dbname") or "mailroom")
    admin_url = make_conninfo(database_url, dbname="postgres")
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists:
            return False
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return True
