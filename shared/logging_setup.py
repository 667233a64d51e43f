"""One log format for every service: timestamp, level, logger, message. Never a secret."""

from __future__ import annotations

import logging


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    # Third-party loggers that would otherwise narrate every connection at INFO.
    for noisy in ("amqp", "kombu", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
