"""``mailroom run config-api``."""

import uvicorn

from services.config_api.app import create_app
from shared.preflight import POSTGRES, RABBITMQ, REDIS, require
from shared.settings import Settings


def run(settings: Settings) -> None:
    require(settings, (POSTGRES, RABBITMQ, REDIS))  # Redis: the OAuth2 refresh lock
    uvicorn.run(
        create_app(settings), host=settings.api_host, port=settings.api_port, log_config=None
    )
