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


def make_pool(
    settings: Settings, *, min_size: int = 1, max_size: int = 10
) -> ConnectionPool[DictConnection]:
    """A pool whose connections return rows as dicts; opened and checked before returning."""
    pool: ConnectionPool[DictConnection] = ConnectionPool(
        settings.database_url,
        min_size=min_size,
        max_size=max_size,
        connection_class=cast(type[DictConnection], psycopg.Connection),
        kwargs={"row_factory": dict_row},
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
