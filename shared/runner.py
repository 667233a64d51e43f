"""How ``mailroom run SERVICE`` starts a worker service in the foreground."""

from __future__ import annotations

from shared.config_follower import ConfigFollower
from shared.db.pool import make_pool
from shared.preflight import ALL, require
from shared.settings import Settings


def run_follower(worker_class: type[ConfigFollower], settings: Settings) -> None:
    require(settings, ALL)
    pool = make_pool(settings, max_size=4)
    try:
        worker_class(settings, pool).run_until_signalled()
    finally:
        pool.close()
