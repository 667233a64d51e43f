"""The test suite's own settings: its own database, RabbitMQ vhost and Redis database.

Set before anything reads settings, so that the suite never touches what ``make run`` keeps
(database ``mailroom``, vhost ``/``, Redis db 0). Subprocesses inherit these variables.
"""

from __future__ import annotations

import os
import secrets
import tempfile

from cryptography.fernet import Fernet

# Several suites may run side by side on one machine (engineers working in parallel): each sets
# MAILROOM_TEST_INSTANCE to a short name of its own and gets its own database, vhost and Redis db.
_INSTANCE = os.environ.get("MAILROOM_TEST_INSTANCE", "")
_SUFFIX = f"_{_INSTANCE}" if _INSTANCE else ""
TEST_VHOST = f"mailroom_test{_SUFFIX}"
TEST_DATABASE = f"mailroom_test{_SUFFIX}"
TEST_REDIS_DB = 15 - (sum(map(ord, _INSTANCE)) % 8 if _INSTANCE else 0)
TEST_AMQP_URL = f"amqp://guest:guest@127.0.0.1:5672/{TEST_VHOST}"
TEST_DATABASE_URL = f"postgresql://postgres@127.0.0.1:5432/{TEST_DATABASE}"
# The mail lab and the fake servers listen on loopback, which production denies.
LAB_ALLOWED_NETWORKS = "127.0.0.0/8,::1/128"


def install() -> None:
    os.environ.update(
        {
            "MAILROOM_AMQP_URL": TEST_AMQP_URL,
            "MAILROOM_DATABASE_URL": TEST_DATABASE_URL,
            "MAILROOM_REDIS_URL": f"redis://127.0.0.1:6379/{TEST_REDIS_DB}",
            "MAILROOM_SECRET_KEYS": Fernet.generate_key().decode(),
            "MAILROOM_TOKEN_SIGNING_KEY": secrets.token_urlsafe(48),
            "MAILROOM_STATE_DIR": tempfile.mkdtemp(prefix="mailroom-test-state-"),
            "MAILROOM_OUTBOX_POLL_SECONDS": "0.5",
            "MAILROOM_PROBE_TIMEOUT_SECONDS": "2",
            "MAILROOM_LOG_LEVEL": "DEBUG",
            "MAILROOM_ALLOWED_NETWORKS": LAB_ALLOWED_NETWORKS,
        }
    )
