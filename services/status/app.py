"""The status service's HTTP side: health and metrics today; the status API comes next."""

from __future__ import annotations

from fastapi import FastAPI

from services.status.config_watch import StatusConfigWatch
from shared.http_ops import ops_router
from shared.settings import Settings


def create_app(settings: Settings, watch: StatusConfigWatch) -> FastAPI:
    app = FastAPI(title="Mailroom status service", version="1")
    app.state.settings = settings

    def ready() -> str | None:
        return None if watch.consuming else "not consuming config events from RabbitMQ"

    app.include_router(ops_router(ready))
    return app
