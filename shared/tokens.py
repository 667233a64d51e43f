"""Bearer tokens: who is calling, for which tenant (company), with which permissions.

Tokens are JWTs signed with HS256 under ``MAILROOM_TOKEN_SIGNING_KEY``. The platform's identity
service is expected to mint them in production; ``mailroom token`` mints them for development,
tests and scripts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import OctKey

MANAGE = "email_servers:manage"
READ = "email_servers:read"
KNOWN_PERMISSIONS = frozenset({MANAGE, READ})
_ALGORITHM = "HS256"


class InvalidTokenError(Exception):
    """The token is missing, malformed, wrongly signed or expired."""


@dataclass(frozen=True)
class Principal:
    """The caller a valid token names."""

    subject: str
    tenant_id: str
    permissions: frozenset[str]

    def may(self, permission: str) -> bool:
        # manage implies read: an admin who can change servers can see them.
        return permission in self.permissions or (permission == READ and MANAGE in self.permissions)


def mint_token(
    key: str, *, tenant_id: str, permissions: list[str], subject: str, ttl_seconds: int
) -> str:
    now = int(time.time())
    claims = {
        "sub": subject,
        "tenant": tenant_id,
        "permissions": sorted(set(permissions)),
        "iat": now,
        "exp": now + ttl_seconds,
    }
    return jwt.encode({"alg": _ALGORITHM}, claims, OctKey.import_key(key))


def verify_token(key: str, token: str) -> Principal:
    try:
        decoded = jwt.decode(token, OctKey.import_key(key), algorithms=[_ALGORITHM])
        jwt.JWTClaimsRegistry(
            exp={"essential": True}, tenant={"essential": True}, sub={"essential": True}
        ).validate(decoded.claims)
    except (JoseError, ValueError) as exc:
        raise InvalidTokenError(str(exc) or type(exc).__name__) from exc
    claims = decoded.claims
    permissions = claims.get("permissions", [])
    tenant = claims["tenant"]
    # An empty tenant would name the operator's own servers (EmailServer.operators_own).
    if not isinstance(tenant, str) or not tenant or not isinstance(permissions, list):
        raise InvalidTokenError("malformed claims")
    return Principal(
        subject=str(claims["sub"]),
        tenant_id=claims["tenant"],
        permissions=frozenset(str(p) for p in permissions),
    )
