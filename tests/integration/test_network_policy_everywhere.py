"""One network policy, applied by the probe, the fetcher, the sender and the OAuth2 token client.

A trap listens on loopback and records every connection. In production loopback is denied, so
under the production policy nothing may reach the trap, however its address is spelled; with
loopback allowed (as in the tests and ``make run``) the same code does reach it, which shows the
trap would have seen a connection.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import replace

import pytest
from fastapi.testclient import TestClient
from psycopg_pool import ConnectionPool

from shared.db.pool import DictConnection
from shared.email_servers import AuthType, EmailServer, ServerType
from shared.mail.connector import Connector
from shared.mail.network_policy import DENIED_BY_DEFAULT, NetworkPolicy
from shared.oauth.provider_client import ProviderClient, ProviderUnavailable
from shared.oauth.providers import OAuthProvider
from shared.probe import ConnectionProbe
from shared.secrets import SecretBox
from shared.settings import Settings
from tests.lab.certs import LabCertificates
from tests.lab.smtp_server import SmtpLab
from tests.support import rabbit
from tests.support.fetching import fetcher_settings, reports_for, running_fetcher
from tests.support.mail_servers import lab_connector
from tests.support.processes import ServiceProcess
from tests.support.sender import (
    command,
    new_tenant,
    publish,
    results_for,
    sender_env,
    start_sender,
    wait_known,
)

PRODUCTION = NetworkPolicy.parse(DENIED_BY_DEFAULT)
# Loopback, spelled as a tenant admin might to get past a check of the text.
LOOPBACK_SPELLINGS = ["127.0.0.1", "127.1", "017700000001", "::ffff:127.0.0.1", "localhost."]


class Trap:
    """A TCP listener on 127.0.0.1 that counts the connections it accepts."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                peer, _ = self._server.accept()
            except OSError:
                return
            self.connections += 1
            peer.close()

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def trap() -> Iterator[Trap]:
    listener = Trap()
    yield listener
    listener.close()


def server_at(host: str, port: int, server_type: ServerType, tenant: str = "acme") -> EmailServer:
    return EmailServer(
        id="00000000-0000-0000-0000-00000000000a",
        tenant_id=tenant,
        type=server_type,
        name="trap",
        host=host,
        port=port,
        tls=False,
        auth_type=AuthType.BASIC,
        enabled=True,
        version=1,
        username="someone@example.org",
        routing_plan_id="plan" if server_type.inbound else None,
    )


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
@pytest.mark.parametrize("server_type", list(ServerType))
def test_the_probe_never_connects_where_the_policy_denies(
    trap: Trap, mail_lab_certs: LabCertificates, host: str, server_type: ServerType
) -> None:
    production = ConnectionProbe(replace(lab_connector(mail_lab_certs, 2.0), policy=PRODUCTION))
    result = production(server_at(host, trap.port, server_type), "secret")
    assert not result.ok
    assert result.reason is not None and "not allowed by this installation" in result.reason
    assert trap.connections == 0

    allowing = ConnectionProbe(lab_connector(mail_lab_certs, 2.0))  # loopback allowed
    allowing(server_at(host, trap.port, server_type), "secret")
    assert trap.connections == 1


@pytest.mark.parametrize("host", ["::ffff:127.0.0.1", "017700000001"])
def test_the_fetcher_never_connects_where_the_policy_denies(
    trap: Trap,
    client: TestClient,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
    mail_lab_certs: LabCertificates,
    host: str,
) -> None:
    api, _ = new_tenant(client, settings)
    plan = api.routing_plan("trap plan")
    saved = api.create(
        type="imap", name="trap", host=host, port=trap.port, tls=False, username="u",
        password="pw", routing_plan_id=plan, enabled=False, sni_hostname="mail.example.org",
    )  # fmt: skip
    with pool.connection() as conn:  # enabled without the API's connection test
        conn.execute("UPDATE email_servers SET enabled = true WHERE id = %s", (saved["id"],))
    production = fetcher_settings(settings, mail_lab_certs, allowed_networks="")
    with running_fetcher(production, pool):
        reports = reports_for(settings.amqp_url, saved["id"], timeout=15, ok=False)
    assert reports, "the fetcher reported nothing about the mailbox"
    assert "not allowed by this installation" in reports[0]["reason"]
    assert trap.connections == 0


def test_the_sender_never_connects_where_the_policy_denies(
    trap: Trap,
    client: TestClient,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
    mail_lab_certs: LabCertificates,
    smtp_default_lab: SmtpLab,
    results: rabbit.EventTap,
) -> None:
    api, tenant = new_tenant(client, settings)
    saved = api.create(
        type="smtp", name="trap", host="::ffff:127.0.0.1", port=trap.port, tls=False,
        username="agent@acme.example", password="pw", role="agent", enabled=False,
    )  # fmt: skip
    with pool.connection() as conn:
        conn.execute("UPDATE email_servers SET enabled = true WHERE id = %s", (saved["id"],))
    sender: ServiceProcess = start_sender(
        sender_env(mail_lab_certs, smtp_default_lab, MAILROOM_ALLOWED_NETWORKS="")
    )
    try:
        wait_known(sender, saved)
        body = command(tenant, **{"from": "agent@acme.example"})
        publish(settings.amqp_url, body)
        first = results_for(results, body["request_id"], final=False, timeout=15)[0]
    finally:
        sender.terminate()
    assert first["status"] != "sent"
    assert "not allowed by this installation" in first["reason"]
    assert trap.connections == 0


def test_the_token_client_never_connects_where_the_policy_denies(
    trap: Trap, settings: Settings
) -> None:
    provider = OAuthProvider(
        name="trap",
        authorize_url=f"http://127.1:{trap.port}/authorize",
        token_url=f"http://127.1:{trap.port}/token",
        client_id="mailroom",
        client_secret="client-secret",
        scopes={ServerType.IMAP: ("mail",)},
    )
    secrets = SecretBox.from_settings(settings)
    production = ProviderClient(provider, secrets, "http://127.0.0.1/callback", PRODUCTION)
    with pytest.raises(ProviderUnavailable) as refused:
        production.refresh(ServerType.IMAP, "refresh-token")
    assert "connections to 127.0.0.1 are not allowed by this installation" in refused.value.reason
    assert trap.connections == 0

    allowing = ProviderClient(
        provider, secrets, "http://127.0.0.1/callback", NetworkPolicy.from_settings(settings)
    )
    with pytest.raises(ProviderUnavailable):  # the trap answers nothing a token client likes
        allowing.refresh(ServerType.IMAP, "refresh-token")
    assert trap.connections == 1


def test_the_operators_own_relay_is_not_subject_to_the_tenants_policy(
    smtp_default_lab: SmtpLab, mail_lab_certs: LabCertificates
) -> None:
    """The system default SMTP server is the operator's choice (often a relay on loopback)."""
    connector = Connector(PRODUCTION, timeout=2.0, ca_bundle=mail_lab_certs.ca)
    relay = replace(server_at("127.0.0.1", smtp_default_lab.port, ServerType.SMTP), tenant_id="")
    with connector.connect(relay) as sock:
        assert sock.getpeername()[1] == smtp_default_lab.port
    with pytest.raises(Exception, match="not allowed by this installation"):
        connector.connect(replace(relay, tenant_id="acme"))
