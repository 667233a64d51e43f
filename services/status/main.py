"""``mailroom run status``: the config watch in a thread, the HTTP API in the foreground."""

import uvicorn

from services.status.app import create_app
from services.status.config_watch import StatusConfigWatch
from shared.db.pool import make_pool
from shared.preflight import ALL, require
from shared.settings import Settings


def run(settings: Settings) -> None:
    require(settings, ALL)
    pool = make_pool(settings, max_size=4)
    watch = StatusConfigWatch(settings, pool)
    thread = watch.start_in_thread()
    try:
        uvicorn.run(
            create_app(settings, watch),
            host=settings.status_host,
            port=settings.status_port,
            log_config=None,
        )
    finally:
        watch.stop()
        thread.join(timeout=5)
        pool.close()
