"""``GET /healthz`` and ``GET /metrics``, the same on every Mailroom HTTP service."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Response, status
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


def ops_router(ready: Callable[[], str | None]) -> APIRouter:
    """``ready`` returns None when the service can serve, else what it is missing."""
    router = APIRouter(tags=["operations"])

    @router.get(
        "/healthz",
        responses={
            503: {
                "description": "The service cannot serve now; `reason` says why.",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        },
    )
    def healthz(response: Response) -> dict[str, str]:
        problem = ready()
        if problem is not None:
            response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
            return {"status": "unavailable", "reason": problem}
        return {"status": "ok"}

    @router.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return router
