"""Re-encrypt every stored secret under the newest key (``mailroom rotate-keys``).

Procedure for the operator: put the new key first in ``MAILROOM_SECRET_KEYS`` (keep the old
ones after it), restart the services, run ``mailroom rotate-keys``, then drop the old keys.
"""

from __future__ import annotations

from psycopg import sql

from shared.db.pool import DictConnection
from shared.secrets import SecretBox

# Every column that holds a Fernet token, as (table, key column, column). Add new secret
# columns here.
ENCRYPTED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("email_servers", "id", "password_encrypted"),
    ("oauth_tokens", "server_id", "access_token_encrypted"),
    ("oauth_tokens", "server_id", "refresh_token_encrypted"),
    ("oauth_consents", "state", "code_verifier_encrypted"),
)


def rotate_all(conn: DictConnection, box: SecretBox) -> int:
    """Re-encrypt all secrets in one transaction; returns how many were rewritten.

    Re-encryption does not change a secret, so versions and config events are left alone.
    """
    count = 0
    with conn.transaction():
        for table, key, column in ENCRYPTED_COLUMNS:
            names = {
                "col": sql.Identifier(column),
                "table": sql.Identifier(table),
                "key": sql.Identifier(key),
            }
            rows = conn.execute(
                sql.SQL(
                    "SELECT {key} AS key, {col} AS token FROM {table}"
                    " WHERE {col} IS NOT NULL FOR UPDATE"
                ).format(**names)
            ).fetchall()
            for row in rows:
                conn.execute(
                    sql.SQL("UPDATE {table} SET {col} = %s WHERE {key} = %s").format(**names),
                    (box.rotate(bytes(row["token"])), row["key"]),
                )
                count += 1
    return count
