"""Errors the config API answers with, and the handlers that shape their JSON.

Every validation problem is a 422 whose ``detail`` entries name the offending ``field``, so a
front end can put the message next to the right input.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from services.config_api.schemas import ConnectionResult
from services.config_api.server_rules import FieldError
from shared.http_auth import AUTH_RESPONSES, Problem
from shared.probe import ProbeResult
from shared.tenant_slots import NoSlot


class ApiError(Exception):
    def __init__(
        self, status_code: int, payload: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(payload.get("detail"))
        self.status_code = status_code
        self.payload = payload
        self.headers = headers


class NotFound(ApiError):
    def __init__(self, what: str = "email server") -> None:
        super().__init__(status.HTTP_404_NOT_FOUND, {"detail": f"{what} not found"})


class FieldsInvalid(ApiError):
    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            {
                "detail": [
                    {
                        "field": e.field,
                        "loc": ["body", e.field],
                        "msg": f"{e.field} {e.message}",
                        "type": "value_error",
                    }
                    for e in errors
                ]
            },
        )


class ConnectionFailed(ApiError):
    """Enabled save whose connection test failed: nothing was saved (CONTRACT.md)."""

    def __init__(self, result: ProbeResult) -> None:
        super().__init__(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            {
                "detail": f"Connection failed: {result.reason}. Nothing was saved; "
                "save with enabled: false to keep these settings as an inactive server.",
                "connection": result.as_json(),
            },
        )


class Conflict(ApiError):
    def __init__(self, detail: str) -> None:
        super().__init__(status.HTTP_409_CONFLICT, {"detail": detail})


class PreconditionFailed(ApiError):
    def __init__(self, current_version: int) -> None:
        super().__init__(
            status.HTTP_412_PRECONDITION_FAILED,
            {
                "detail": "the server was changed by someone else; reload it and try again",
                "current_version": current_version,
            },
        )


class TooBusy(ApiError):
    """No slot for the work asked for (a connection test): the tenant's own limit, or the
    installation's, is reached. ``Retry-After`` says when to try again."""

    def __init__(self, refusal: NoSlot, retry_after_seconds: float) -> None:
        super().__init__(
            status.HTTP_429_TOO_MANY_REQUESTS,
            {"detail": refusal.reason},
            {"Retry-After": str(max(1, math.ceil(retry_after_seconds)))},
        )


# --- the OpenAPI document of these answers ----------------------------------------------------


class FieldProblem(BaseModel):
    field: str = Field(description="The request field at fault (or `body`).")
    loc: list[str | int]
    msg: str
    type: str | None = Field(
        default=None,
        description="`value_error` for a rule the JSON Schema cannot state (a host name that "
        "IDNA refuses, a rule across fields, a stored secret that needs typing again); "
        "otherwise the validator's error type.",
    )


class Invalid(BaseModel):
    """422: the request is refused; nothing was saved."""

    detail: list[FieldProblem] | str = Field(
        description="The fields at fault, or (connection test failed) a sentence."
    )
    connection: ConnectionResult | None = Field(
        default=None, description="An enabled save whose connection test failed: its result."
    )


class StaleVersion(BaseModel):
    detail: str
    current_version: int


_RESPONSES: dict[int, dict[str, Any]] = {
    400: {
        "model": Problem,
        "description": "The body cannot be read (not UTF-8), or a header is malformed (e.g. "
        "`If-Match`).",
    },
    404: {
        "model": Problem,
        "description": "No such object for this tenant (another tenant's is never revealed).",
    },
    409: {
        "model": Problem,
        "description": "Someone changed the server while its connection was tested; reload and "
        "save again.",
    },
    412: {"model": StaleVersion, "description": "`If-Match` names a version that is not current."},
    422: {
        "model": Invalid,
        "description": "Invalid fields (each named in `detail[].field`), or an enabled save "
        "whose connection test failed (`connection`).",
    },
    429: {
        "model": Problem,
        "description": "Too many connection tests are running: the tenant's own limit "
        "(MAILROOM_PROBE_CONCURRENCY_PER_TENANT) or the installation's "
        "(MAILROOM_PROBE_CONCURRENCY). Nothing was saved.",
        "headers": {
            "Retry-After": {
                "description": "Seconds after which a slot is likely free.",
                "schema": {"type": "integer"},
            }
        },
    },
}


def documented(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route that may answer with these error codes (and 401/403)."""
    return {**AUTH_RESPONSES, **{code: _RESPONSES[code] for code in codes}}


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    detail = []
    for error in exc.errors():
        loc = tuple(error.get("loc", ()))
        named = [p for p in loc[1:] if isinstance(p, str)] if loc else []
        field = named[0] if named else (str(loc[0]) if loc else "body")
        detail.append(
            {
                "field": field,
                "loc": list(loc),
                "msg": f"{field}: {error.get('msg')}",
                "type": error.get("type"),
            }
        )
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        content=jsonable_encoder({"detail": detail}),
    )


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse(
        status_code=exc.status_code, content=jsonable_encoder(exc.payload), headers=exc.headers
    )


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ApiError, _api_error)
