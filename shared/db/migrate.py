"""Versioned schema migrations (Alembic), applied by ``mailroom migrate`` and ``make run``.

Migrations are plain SQL inside Alembic revisions; the services themselves talk to PostgreSQL
with psycopg, so SQLAlchemy is only Alembic's engine here.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from shared.db.pool import ensure_database

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    sqlalchemy_url = database_url.replace("postgresql://", "postgresql+psycopg://", 1)
    config.set_main_option("sqlalchemy.url", sqlalchemy_url.replace("%", "%%"))
    return config


def migrate(database_url: str) -> None:
    """Create the database if needed and bring its schema to the newest revision (idempotent)."""
    ensure_database(database_url)
    command.upgrade(alembic_config(database_url), "head")


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()


def current_revision(database_url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine

    url = alembic_config(database_url).get_main_option("sqlalchemy.url")
    assert url is not None
    engine = create_engine(url.replace("%%", "%"))
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
