"""The status service's view of which servers exist and are enabled (state ``disabled``)."""

from __future__ import annotations

from shared.config_follower import ConfigFollower


class StatusConfigWatch(ConfigFollower):
    service_name = "status"
