"""``mailroom run sender``."""

from services.sender.service import SenderService
from shared.metrics import serve_metrics
from shared.runner import run_follower
from shared.settings import Settings


def run(settings: Settings) -> None:
    serve_metrics(settings.metrics_host, settings.sender_metrics_port, "sender")
    run_follower(SenderService, settings)
