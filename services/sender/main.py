"""``mailroom run sender``."""

from services.sender.supervisor import SenderSupervisor
from shared.runner import run_follower
from shared.settings import Settings


def run(settings: Settings) -> None:
    run_follower(SenderSupervisor, settings)
