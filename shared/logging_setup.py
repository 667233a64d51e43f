"""One log format for every service: timestamp, level, logger, message. Never a secret."""

from __future__ import annotations

import logging
import time

# Query strings never logged: the OAuth2 callback's carries the authorization code and state.
_PRIVATE_QUERIES = ("/api/v1/oauth/callback",)


class PrivateQueryFilter(logging.Filter):
    """Cuts the query string off the access-log line of the OAuth2 callback (uvicorn logs
    ``client, method, path?query, version, status`` as the record's arguments)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            path, _, query = args[2].partition("?")
            if query and path.startswith(_PRIVATE_QUERIES):
                record.args = (*args[:2], f"{path}?…", *args[3:])
        return True


class Throttled:
    """A failure that repeats (every tick, while a service is away) logged with its traceback
    at most once per ``seconds``, not once per repetition."""

    def __init__(self, logger: logging.Logger, seconds: float = 60.0) -> None:
        self._logger = logger
        self._seconds = seconds
        self._logged_at = -seconds

    def exception(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._logged_at >= self._seconds:
            self._logged_at = now
            self._logger.exception(message, *args)


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    # Third-party loggers that would otherwise narrate every connection at INFO.
    for noisy in ("amqp", "kombu", "pika", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").addFilter(PrivateQueryFilter())
