"""``mailroom run fetcher``."""

from services.fetcher.supervisor import FetcherSupervisor
from shared.metrics import serve_metrics
from shared.runner import run_follower
from shared.settings import Settings


def run(settings: Settings) -> None:
    serve_metrics(settings.metrics_host, settings.fetcher_metrics_port, "fetcher")
    run_follower(FetcherSupervisor, settings)
