"""Errors the config API answers with, and the handlers that shape their JSON.

Every validation problem is a 422 whose ``detail`` entries name the offending ``field``, so a
front end can put the message next to the right input.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from services.config_api.server_rules import FieldError
from shared.probe import ProbeResult


class ApiError(Exception):
    def __init__(self, status_code: int, payload: dict[str, Any]) -> None:
        super().__init__(payload.get("detail"))
        self.status_code = status_code
        self.payload = payload


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
    return JSONResponse(status_code=exc.status_code, content=jsonable_encoder(exc.payload))


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ApiError, _api_error)
