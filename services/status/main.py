"""``mailroom run status``: the worker in a thread, the HTTP API in the foreground."""

import uvicorn

from services.status.app import create_app
from services.status.worker import StatusWorker
from shared.db.pool import make_pool
from shared.preflight import ALL, require
from shared.settings import Settings


def run(settings: Settings) -> None:
    require(settings, ALL)
    pool = make_pool(settings, max_size=4)
    worker = StatusWorker(settings, pool)
    thread = worker.start_in_thread()
    try:
        uvicorn.run(
            create_app(settings, worker),
            host=settings.status_host,
            port=settings.status_port,
            log_config=None,
            timeout_graceful_shutdown=3,  # open event streams end with the process
        )
    finally:
        worker.stop()
        thread.join(timeout=5)
        pool.close()
