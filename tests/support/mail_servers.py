"""Mail servers of the lab as Mailroom sees them: unsaved ``EmailServer`` objects."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from shared.email_servers import AuthType, EmailServer, ServerType
from shared.mail.connector import Connector
from shared.settings import Settings
from tests.lab.certs import LabCertificates
from tests.lab.dovecot import DovecotLab, LabUser
from tests.lab.fixtures import SMTP_LAB_USER
from tests.lab.smtp_server import SmtpLab


def lab_connector(certs: LabCertificates, timeout: float = 5.0) -> Connector:
    """How the services reach the lab: the test settings' policy (loopback allowed), the
    lab's CA trusted."""
    return replace(Connector.from_settings(Settings(), timeout), ca_bundle=certs.ca)


def lab_server(
    lab: DovecotLab,
    user: LabUser,
    server_type: ServerType = ServerType.IMAP,
    *,
    tls: bool = True,
    **overrides: Any,
) -> EmailServer:
    ports = {
        (ServerType.IMAP, True): lab.imaps_port,
        (ServerType.IMAP, False): lab.imap_port,
        (ServerType.POP3, True): lab.pop3s_port,
        (ServerType.POP3, False): lab.pop3_port,
    }
    values: dict[str, Any] = {
        "id": "00000000-0000-0000-0000-000000000001",
        "tenant_id": "acme",
        "type": server_type,
        "name": "lab",
        "host": "localhost",
        "port": ports[(server_type, tls)],
        "tls": tls,
        "auth_type": AuthType.BASIC,
        "enabled": True,
        "version": 1,
        "username": user.name,
        "inbox_folder": "INBOX" if server_type is ServerType.IMAP else None,
        "routing_plan_id": "plan",
    }
    values.update(overrides)
    return EmailServer(**values)


def smtp_lab_server(lab: SmtpLab, **changes: Any) -> EmailServer:
    """The lab's SMTP server on its STARTTLS port, logging in as ``SMTP_LAB_USER``."""
    values: dict[str, Any] = {
        "id": "",
        "tenant_id": "acme",
        "type": ServerType.SMTP,
        "name": "out",
        "host": "127.0.0.1",
        "port": lab.port,
        "tls": False,
        "auth_type": AuthType.BASIC,
        "enabled": True,
        "version": 0,
        "username": SMTP_LAB_USER,
    }
    values.update(changes)
    return EmailServer(**values)


class RecordedHandover:
    """A :class:`~shared.mail.smtp.Handover` that notes each start; it fails when told to
    (the caller's record could not be made)."""

    def __init__(self, steps: list[str], *, fail_at: str | None = None) -> None:
        self.steps, self.fail_at = steps, fail_at

    def start(self) -> None:
        self.steps.append("start")
        if self.fail_at == "start":
            raise RuntimeError("the record of the handover failed")
