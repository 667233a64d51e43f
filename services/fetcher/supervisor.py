"""The fetcher's supervisor: knows every POP3/IMAP server and, per mailbox, its poller.

Pollers (IMAP with IDLE, POP3) arrive with the fetcher issue; today the supervisor follows the
configuration so that a new, changed or deleted inbound server is known within a second.
"""

from __future__ import annotations

from shared.config_follower import ConfigFollower
from shared.email_servers import ServerType


class FetcherSupervisor(ConfigFollower):
    service_name = "fetcher"
    server_types = (ServerType.IMAP, ServerType.POP3)
