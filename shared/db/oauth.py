"""SQL for OAuth2 tokens and started consents. Callers own the transaction.

Tokens are stored encrypted; this module never sees plaintext (``shared.oauth.tokens`` does
the encrypting through the one ``SecretBox``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from shared.db.pool import DictConnection


@dataclass(frozen=True)
class StoredTokens:
    server_id: str
    provider: str
    access_token_encrypted: bytes = field(repr=False)
    refresh_token_encrypted: bytes | None = field(repr=False)
    expires_at: datetime
    refresh_due_at: datetime
    consented_at: datetime
    refresh_token_issued_at: datetime
    refreshed_at: datetime | None
    reauth_reason: str | None
    version: int


@dataclass(frozen=True)
class StartedConsent:
    state: str
    tenant_id: str
    server_id: str
    admin: str
    provider: str
    username: str
    code_verifier_encrypted: bytes = field(repr=False)


def _tokens(row: Mapping[str, Any]) -> StoredTokens:
    refresh = row["refresh_token_encrypted"]
    return StoredTokens(
        server_id=str(row["server_id"]),
        provider=row["provider"],
        access_token_encrypted=bytes(row["access_token_encrypted"]),
        refresh_token_encrypted=bytes(refresh) if refresh is not None else None,
        expires_at=row["expires_at"],
        refresh_due_at=row["refresh_due_at"],
        consented_at=row["consented_at"],
        refresh_token_issued_at=row["refresh_token_issued_at"],
        refreshed_at=row["refreshed_at"],
        reauth_reason=row["reauth_reason"],
        version=row["version"],
    )


def get(conn: DictConnection, server_id: str, *, for_update: bool = False) -> StoredTokens | None:
    query = "SELECT * FROM oauth_tokens WHERE server_id = %s"
    if for_update:
        query = "SELECT * FROM oauth_tokens WHERE server_id = %s FOR UPDATE"
    row = conn.execute(query, (server_id,)).fetchone()
    return _tokens(row) if row else None


def get_many(conn: DictConnection, server_ids: Iterable[str]) -> dict[str, StoredTokens]:
    ids = list(server_ids)
    if not ids:
        return {}
    rows = conn.execute(
        "SELECT * FROM oauth_tokens WHERE server_id = ANY(%s::uuid[])", (ids,)
    ).fetchall()
    return {str(row["server_id"]): _tokens(row) for row in rows}


def store_consented(
    conn: DictConnection,
    server_id: str,
    provider: str,
    access_token: bytes,
    refresh_token: bytes | None,
    expires_at: datetime,
    refresh_due_at: datetime,
) -> StoredTokens:
    """Tokens of a fresh consent replace whatever was there, a ``reauth_required`` included."""
    row = conn.execute(
        "INSERT INTO oauth_tokens (server_id, provider, access_token_encrypted,"
        " refresh_token_encrypted, expires_at, refresh_due_at, consented_at,"
        " refresh_token_issued_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, now(), now())"
        " ON CONFLICT (server_id) DO UPDATE SET provider = EXCLUDED.provider,"
        " access_token_encrypted = EXCLUDED.access_token_encrypted,"
        " refresh_token_encrypted = EXCLUDED.refresh_token_encrypted,"
        " expires_at = EXCLUDED.expires_at, refresh_due_at = EXCLUDED.refresh_due_at,"
        " consented_at = now(), refresh_token_issued_at = now(), refreshed_at = NULL,"
        " reauth_reason = NULL, version = oauth_tokens.version + 1"
        " RETURNING *",
        (server_id, provider, access_token, refresh_token, expires_at, refresh_due_at),
    ).fetchone()
    assert row is not None
    return _tokens(row)


def store_refreshed(
    conn: DictConnection,
    previous: StoredTokens,
    access_token: bytes,
    refresh_token: bytes | None,
    expires_at: datetime,
    refresh_due_at: datetime,
) -> StoredTokens | None:
    """Store a refresh's result unless someone stored newer tokens meanwhile (then ``None``).

    A rotated refresh token replaces the old one in the same statement as the access token:
    there is no moment where the new access token is stored and the new refresh token lost.
    """
    row = conn.execute(
        "UPDATE oauth_tokens SET access_token_encrypted = %s,"
        " refresh_token_encrypted = COALESCE(%s, refresh_token_encrypted),"
        " refresh_token_issued_at = CASE WHEN %s::bytea IS NULL THEN refresh_token_issued_at"
        " ELSE now() END,"
        " expires_at = %s, refresh_due_at = %s, refreshed_at = now(), version = version + 1"
        " WHERE server_id = %s AND version = %s RETURNING *",
        (
            access_token,
            refresh_token,
            refresh_token,
            expires_at,
            refresh_due_at,
            previous.server_id,
            previous.version,
        ),
    ).fetchone()
    return _tokens(row) if row else None


def mark_reauth_required(conn: DictConnection, previous: StoredTokens, reason: str) -> bool:
    """The provider refused the refresh token: stop using the server until a new consent."""
    done = conn.execute(
        "UPDATE oauth_tokens SET reauth_reason = %s, version = version + 1"
        " WHERE server_id = %s AND version = %s",
        (reason, previous.server_id, previous.version),
    ).rowcount
    return done == 1


def mark_refresh_due(conn: DictConnection, previous: StoredTokens) -> None:
    """The mail server refused the access token: get a new one before the next login."""
    conn.execute(
        "UPDATE oauth_tokens SET refresh_due_at = least(refresh_due_at, now())"
        " WHERE server_id = %s AND version = %s"
        " AND coalesce(refreshed_at, consented_at) < now() - interval '1 minute'",
        (previous.server_id, previous.version),
    )


def start_consent(
    conn: DictConnection,
    *,
    state: str,
    tenant_id: str,
    server_id: str,
    admin: str,
    provider: str,
    username: str,
    code_verifier: bytes,
    expires_at: datetime,
) -> None:
    conn.execute("DELETE FROM oauth_consents WHERE expires_at < now()")
    conn.execute(
        "INSERT INTO oauth_consents (state, tenant_id, server_id, admin, provider, username,"
        " code_verifier_encrypted, expires_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (state, tenant_id, server_id, admin, provider, username, code_verifier, expires_at),
    )


def forget(conn: DictConnection, server_id: str) -> None:
    """The server now names another mailbox or provider: its tokens and started consents
    belong to the old one."""
    conn.execute("DELETE FROM oauth_tokens WHERE server_id = %s", (server_id,))
    conn.execute("DELETE FROM oauth_consents WHERE server_id = %s", (server_id,))


def take_consent(conn: DictConnection, state: str) -> StartedConsent | None:
    """The consent started with ``state``, used up (a state is good for one callback)."""
    row = conn.execute(
        "DELETE FROM oauth_consents WHERE state = %s AND expires_at > now() RETURNING *",
        (state,),
    ).fetchone()
    if row is None:
        return None
    return StartedConsent(
        state=row["state"],
        tenant_id=row["tenant_id"],
        server_id=str(row["server_id"]),
        admin=row["admin"],
        provider=row["provider"],
        username=row["username"],
        code_verifier_encrypted=bytes(row["code_verifier_encrypted"]),
    )
