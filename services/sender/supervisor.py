"""The sender's supervisor: knows every SMTP server, for resolving sender addresses.

Send commands (``mailroom.send``) are consumed with the sender issue; today it follows the
configuration so that resolution will see changes within a second, without a restart.
"""

from __future__ import annotations

from shared.config_follower import ConfigFollower
from shared.email_servers import ServerType


class SenderSupervisor(ConfigFollower):
    service_name = "sender"
    server_types = (ServerType.SMTP,)
