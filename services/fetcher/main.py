"""``mailroom run fetcher``."""

from services.fetcher.supervisor import FetcherSupervisor
from shared.runner import run_follower
from shared.settings import Settings


def run(settings: Settings) -> None:
    run_follower(FetcherSupervisor, settings)
