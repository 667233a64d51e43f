"""Bearer-token authentication for every Mailroom HTTP API (config API and status service).

401 when the token is missing or invalid, 403 when it lacks the permission (CONTRACT.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from shared.settings import Settings
from shared.tokens import InvalidTokenError, Principal, verify_token

_bearer = HTTPBearer(auto_error=False, description="A token minted by `mailroom token`.")


class Problem(BaseModel):
    """An error answer: what went wrong, in words for the admin."""

    detail: str


# The answers every authenticated call may give, for its OpenAPI document.
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {
        "model": Problem,
        "description": "No bearer token, or one that is invalid or expired.",
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
    },
    403: {"model": Problem, "description": "The token lacks the permission this call needs."},
}


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"}
    )


def current_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None:
        raise _unauthorized("a bearer token is required")
    settings: Settings = request.app.state.settings
    try:
        return verify_token(settings.token_key, credentials.credentials)
    except InvalidTokenError as exc:
        raise _unauthorized(f"invalid token: {exc}") from exc


def require(permission: str) -> Callable[[Principal], Principal]:
    """A dependency that yields the caller when its token holds ``permission``."""

    def check(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
        if not principal.may(permission):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, detail=f"the token lacks the permission {permission}"
            )
        return principal

    return check
