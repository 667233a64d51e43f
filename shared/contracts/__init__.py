"""Messages that cross process boundaries: versioned, frozen pydantic models, JSON on the wire.

One module per flow: ``config_events`` (config API → workers), ``status_reports`` (workers →
status service). Their JSON shapes that other services see are part of CONTRACT.md.
"""

from shared.contracts.config_events import ConfigEvent, EmailServerChange, RoutingPlanEvent
from shared.contracts.send import SendCommand, SendResult

__all__ = ["ConfigEvent", "EmailServerChange", "RoutingPlanEvent"]
__all__ += ["SendCommand", "SendResult"]
