"""A per-server send-rate limit: mails over the limit wait for their turn, none fails."""

from __future__ import annotations

from fastapi.testclient import TestClient

from shared.settings import Settings
from tests.lab.certs import LabCertificates
from tests.lab.smtp_server import SmtpLab
from tests.support import rabbit
from tests.support.sender import (
    command,
    new_tenant,
    publish,
    results_for,
    sender_env,
    smtp_server,
    start_sender,
    wait_known,
)


def test_mails_over_the_rate_limit_wait_and_are_all_sent(
    mail_lab_certs: LabCertificates,
    smtp_lab: SmtpLab,
    smtp_default_lab: SmtpLab,
    client: TestClient,
    settings: Settings,
    results: rabbit.EventTap,
) -> None:
    smtp_lab.clear()
    env = sender_env(
        mail_lab_certs,
        smtp_default_lab,
        MAILROOM_SENDER_RATE_PER_MINUTE="120",  # one mail every 0.5 s per server
        MAILROOM_SENDER_RATE_BURST="1",
    )
    api, tenant = new_tenant(client, settings)
    sender = start_sender(env)
    try:
        server = api.create(**smtp_server(smtp_lab, "agent1@lab.test"))
        wait_known(sender, server)
        bodies = [command(tenant) for _ in range(5)]
        for body in bodies:
            publish(settings.amqp_url, body)
        finals = [results_for(results, b["request_id"], timeout=15)[-1] for b in bodies]
    finally:
        sender.terminate()
    assert [r["status"] for r in finals] == ["sent"] * 5
    assert all(r["attempts"] == 1 for r in finals)
    # Five mails at two per second: the first at once, then one every half second (timed at
    # the SMTP server, where the rate is promised).
    arrivals = sorted(mail.path.stat().st_mtime for mail in smtp_lab.mails())
    assert arrivals[-1] - arrivals[0] >= 1.8
    assert smtp_lab.count() == 5
