"""The status service's HTTP side: the status API and its stream, health and metrics."""

from __future__ import annotations

import time

from fastapi import FastAPI

from services.status.api import status_router
from services.status.worker import StatusWorker
from shared.http_ops import ops_router
from shared.settings import Settings

TICKS_FAILING_SECONDS = 60.0


def create_app(settings: Settings, worker: StatusWorker) -> FastAPI:
    app = FastAPI(title="Mailroom status service", version="1")
    app.state.settings = settings

    def ready() -> str | None:
        if not worker.consuming:
            return "not consuming config events and status reports from RabbitMQ"
        failing_since = worker.ticks_failing_since
        if failing_since is not None and time.monotonic() - failing_since > TICKS_FAILING_SECONDS:
            return "its periodic work (stale checks, alerts) has failed for over a minute"
        try:
            worker.store.redis.ping()
        except Exception as exc:  # noqa: BLE001 - any failure means: cannot serve
            return f"Redis unavailable: {exc}"
        return None

    app.include_router(ops_router(ready))
    app.include_router(status_router(worker.directory, worker.store, settings, worker.oauth_health))
    return app
