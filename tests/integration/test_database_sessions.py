"""Every long-lived session notices a vanished peer within about a minute (real PostgreSQL):
the server ends it and releases its advisory locks, which another process is waiting for."""

from __future__ import annotations

from typing import Any

import psycopg

from shared.db.pool import make_pool, session_options
from shared.settings import Settings

KEEPALIVES = ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count")


def shown(conn: psycopg.Connection[Any], *names: str) -> list[str]:
    values = []
    for name in names:
        row = conn.execute(f"SHOW {name}").fetchone()
        assert row is not None
        values.append(str(row[name] if isinstance(row, dict) else row[0]))
    return values


def test_pooled_sessions_have_keepalives_on_both_sides(settings: Settings) -> None:
    pool = make_pool(settings, max_size=1)
    try:
        with pool.connection() as conn:
            assert shown(conn, *KEEPALIVES) == ["30", "10", "3"]  # the server's side
            assert conn.info.get_parameters()["keepalives_idle"] == "30"  # the client's
    finally:
        pool.close()


def test_options_of_the_database_url_are_kept_beside_the_keepalives(settings: Settings) -> None:
    url = f"{settings.database_url}?options=-c%20statement_timeout%3D4321"
    with psycopg.connect(url, **session_options(url)) as conn:
        assert shown(conn, *KEEPALIVES, "statement_timeout") == ["30", "10", "3", "4321ms"]
