"""The sender, as a real process, against a real SMTP server (aiosmtpd: STARTTLS, TLS, AUTH).

Every test works in a company of its own (servers of other tests never interfere), publishes
JSON commands to ``mailroom.send`` with pika, and checks what the SMTP server received, the
results on ``mailroom.send.results`` and the dead letters in ``mailroom.send.dead``.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.fernet import Fernet
from fastapi.testclient import TestClient
from psycopg_pool import ConnectionPool

from shared.contracts.config_events import ConfigEvent
from shared.db import email_servers, inbound_messages, outbox, send_requests
from shared.db.pool import DictConnection
from shared.secrets import SecretBox
from shared.settings import Settings
from tests.lab.certs import LabCertificates
from tests.lab.fixtures import SMTP_LAB_USER
from tests.lab.smtp_server import SmtpLab
from tests.support import rabbit
from tests.support.api import ApiClient
from tests.support.processes import ServiceProcess
from tests.support.sender import (
    REPORTS_QUEUE,
    DeadLetters,
    command,
    drain,
    new_tenant,
    publish,
    results_for,
    send,
    sender_env,
    smtp_server,
    start_sender,
    wait_known,
)
from tests.support.waiting import eventually


@pytest.fixture(scope="module")
def sender(
    mail_lab_certs: LabCertificates, smtp_lab: SmtpLab, smtp_default_lab: SmtpLab
) -> Iterator[ServiceProcess]:
    process = start_sender(sender_env(mail_lab_certs, smtp_default_lab))
    try:
        yield process
    finally:
        process.terminate()


@pytest.fixture
def labs(smtp_lab: SmtpLab, smtp_default_lab: SmtpLab) -> tuple[SmtpLab, SmtpLab]:
    smtp_lab.clear()
    smtp_default_lab.clear()
    return smtp_lab, smtp_default_lab


@pytest.fixture
def dead(settings: Settings) -> DeadLetters:
    drain(settings.amqp_url, "mailroom.send.dead")
    return DeadLetters(settings.amqp_url)


@pytest.fixture
def company(client: TestClient, settings: Settings) -> tuple[ApiClient, str]:
    return new_tenant(client, settings)


def _server(
    api: ApiClient, sender: ServiceProcess, lab: SmtpLab, user: str, **fields: object
) -> dict[str, object]:
    server = api.create(**smtp_server(lab, user, **fields))  # type: ignore[arg-type]
    wait_known(sender, server)
    return server


# --- the mail that arrives -----------------------------------------------------------------


def test_mail_arrives_intact_through_starttls_and_auth(
    sender: ServiceProcess,
    labs: tuple[SmtpLab, SmtpLab],
    company: tuple[ApiClient, str],
    results: rabbit.EventTap,
    settings: Settings,
) -> None:
    lab, _ = labs
    api, tenant = company
    server = _server(api, sender, lab, SMTP_LAB_USER, sender_addresses=["support@acme.com"])
    pdf = b"%PDF-1.4\x00\xff\xfe binary \r\n bytes" * 50
    body = command(
        tenant,
        **{
            "from": "Support Team <SUPPORT@acme.com>",
            "to": ["Jürgen Groß <juergen@example.org>", "b@example.org"],
            "cc": ["c@example.org"],
            "bcc": ["hidden@example.org"],
            "reply_to": "replies@acme.com",
            "subject": "Grüße · Ihre Anfrage 😀",
            "text": "Hallo Jürgen,\nanbei die Rechnung.",
            "html": "<p>Hallo J&uuml;rgen,</p>",
            "headers": {"X-Ticket-Id": "T-42"},
            "attachments": [
                {
                    "filename": "Rechnung März.pdf",
                    "content_type": "application/pdf",
                    "data_base64": base64.b64encode(pdf).decode(),
                }
            ],
            "in_reply_to": "<question-1@example.org>",
        },
    )
    [result] = send(settings.amqp_url, results, body)
    assert result["status"] == "sent"
    assert result["final"] is True
    assert result["email_server_id"] == server["id"]
    assert result["smtp_code"] == 250
    assert result["attempts"] == 1
    assert result["tenant_id"] == tenant

    [mail] = lab.wait_for(1)
    assert mail.login == SMTP_LAB_USER  # AUTH (the lab allows it only after STARTTLS)
    assert mail.tls_port is False
    assert mail.envelope_from == "SUPPORT@acme.com"
    assert sorted(mail.recipients) == sorted(
        ["juergen@example.org", "b@example.org", "c@example.org", "hidden@example.org"]
    )
    message = mail.message
    assert b"\r\n" in mail.raw and b"\n" not in mail.raw.replace(b"\r\n", b"")
    assert message["Subject"] == "Grüße · Ihre Anfrage 😀"
    assert message["From"].addresses[0].display_name == "Support Team"
    assert message["To"].addresses[0].display_name == "Jürgen Groß"
    assert "Cc" in message and "c@example.org" in str(message["Cc"])
    assert "Bcc" not in message
    assert b"hidden@example.org" not in mail.raw
    assert str(message["Reply-To"]) == "replies@acme.com"
    assert message["In-Reply-To"] == "<question-1@example.org>"
    assert message["References"] == "<question-1@example.org>"
    assert message["X-Ticket-Id"] == "T-42"
    assert message["Message-ID"] == result["message_id"]
    plain = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert plain is not None and "Hallo Jürgen" in plain.get_content()
    assert html is not None and "J&uuml;rgen" in html.get_content()
    [attachment] = list(message.iter_attachments())
    assert attachment.get_filename() == "Rechnung März.pdf"
    assert attachment.get_content_type() == "application/pdf"
    assert attachment.get_content() == pdf


def test_implicit_tls_server(
    sender: ServiceProcess,
    labs: tuple[SmtpLab, SmtpLab],
    company: tuple[ApiClient, str],
    results: rabbit.EventTap,
    settings: Settings,
) -> None:
    lab, _ = labs
    api, tenant = company
    server = _server(api, sender, lab, "agent1@lab.test", tls=True)
    body = command(tenant, **{"from": "agent1@lab.test"})
    [result] = send(settings.amqp_url, results, body)
    assert result["status"] == "sent", result
    assert result["email_server_id"] == server["id"]
    [mail] = lab.wait_for(1)
    assert mail.tls_port is True
    assert mail.login == "agent1@lab.test"


def test_a_non_ascii_address_goes_out_with_smtputf8(
    sender: ServiceProcess,
    labs: tuple[SmtpLab, SmtpLab],
    company: tuple[ApiClient, str],
    results: rabbit.EventTap,
    settings: Settings,
) -> None:
    """A local part in UTF-8 needs the server's SMTPUTF8; the envelope carries it as is."""
    lab, _ = labs
    api, tenant = company
    _server(api, sender, lab, "agent1@lab.test")
    body = command(tenant, to=["Jörg <jörg.müller@example.org>"], cc=["ann@example.org"])
    [result] = send(settings.amqp_url, results, body)
    assert result["status"] == "sent", result
    [mail] = lab.wait_for(1)
    assert mail.envelope_from == "agent1@lab.test"
    assert sorted(mail.recipients) == ["ann@example.org", "jörg.müller@example.org"]
    assert "<jörg.müller@example.org>".encode() in mail.raw.split(b"\r\n\r\n")[0]


# --- resolution ------------------------------------------------------------------------------


def test_each_from_reaches_the_server_that_owns_it(
    sender: ServiceProcess,
    labs: tuple[SmtpLab, SmtpLab],
    company: tuple[ApiClient, str],
    results: rabbit.EventTap,
    settings: Settings,
) -> None:
    lab, _ = labs
    api, tenant = company
    # Three servers whose addresses share domains; one server per lab login.
    a = _server(api, sender, lab, "agent1@lab.test", sender_addresses=["support@acme.com"])
    b = _server(
        api,
        sender,
        lab,
        "agent2@lab.test",
        sender_addresses=["sales@acme.com", "support@shop.acme.com"],
    )
    c = _server(api, sender, lab, "agent3@lab.test", sender_addresses=["noreply@acme.com"])
    expected = {
        "support@acme.com": (a, "agent1@lab.test"),
        "Sales@ACME.com": (b, "agent2@lab.test"),
        "support@shop.acme.com": (b, "agent2@lab.test"),
        "noreply@acme.com": (c, "agent3@lab.test"),
        "agent1@lab.test": (a, "agent1@lab.test"),
    }
    bodies: dict[str, dict[str, Any]] = {}
    for sender_address in expected:
        body = command(tenant, **{"from": sender_address, "to": [f"to-{len(bodies)}@example.org"]})
        bodies[sender_address] = body
        publish(settings.amqp_url, body)
    for sender_address, (server, _login) in expected.items():
        [result] = results_for(results, bodies[sender_address]["request_id"])
        assert result["status"] == "sent", result
        assert result["email_server_id"] == server["id"], sender_address
    mails = {m.envelope_from.lower(): m for m in lab.wait_for(len(expected))}
    for sender_address, (_, login) in expected.items():
        assert mails[sender_address.lower()].login == login


def test_unknown_sender_fails_with_a_reason_and_is_dead_lettered(
    sender: ServiceProcess,
    labs: tuple[SmtpLab, SmtpLab],
    company: tuple[ApiClient, str],
    results: rabbit.EventTap,
    dead: DeadLetters,
    settings: Settings,
) -> None:
    lab, _ = labs
    api, tenant = company
    _server(api, sender, lab, "agent1@lab.test", sender_addresses=["support@acme.com"])
    body = command(tenant, **{"from": "nobody@acme.com"})
    [result] = send(settings.amqp_url, results, body)
    assert result["status"] == "failed"
    assert result["final"] is True
    assert result["reason"] == "no SMTP server for sender nobody@acme.com"
    letter = dead.wait_for(body["request_id"])
    assert json.loads(letter.body) == body
    assert letter.headers["x-reason"] == result["reason"]
    assert lab.count() == 0


def test_disabled_and_other_tenants_servers_are_never_used(
    sender: ServiceProcess,
    labs: tuple[SmtpLab, SmtpLab],
    company: tuple[ApiClient, str],
    client: TestClient,
    results: rabbit.EventTap,
    settings: Settings,
) -> None:
    lab, _ = labs
    api, tenant = company
    other_api, _ = new_tenant(client, settings)
    _server(other_api, sender, lab, "agent1@lab.test", sender_addresses=["shared@acme.com"])
    _server(
        api, sender, lab, "agent2@lab.test", sender_addresses=["shared@acme.com"], enabled=False
    )
    body = command(tenant, **{"from": "shared@acme.com"})
    [result] = send(settings.amqp_url, results, body)
    assert result["status"] == "failed"
    assert "no SMTP server for sender shared@acme.com" in result["reason"]


def test_without_from_the_one_agent_server_user_is_used_several_fail(
    sender: ServiceProcess,
    labs: tuple[SmtpLab, SmtpLab],
    company: tuple[ApiClient, str],
    results: rabbit.EventTap,
    settings: Settings,
) -> None:
    lab, _ = labs
    api, tenant = company
    first = _server(api, sender, lab, "agent1@lab.test")
    body = command(tenant)
    [result] = send(settings.amqp_url, results, body)
    assert result["status"] == "sent"
    assert result["email_server_id"] == first["id"]
    assert lab.wait_for(1)[0].envelope_from == "agent1@lab.test"

    _server(api, sender, lab, "agent2@lab.test")
    body = command(tenant)
    [result] = send(settings.amqp_url, results, body)
    assert result["status"] == "failed"
    assert "several SMTP servers could send" in result["reason"]


def test_reply_without_from_leaves_from_the_address_the_mail_was_sent_to(
    sender: ServiceProcess,
    labs: tuple[SmtpLab, SmtpLab],
    company: tuple[ApiClient, str],
    results: rabbit.EventTap,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
) -> None:
    lab, _ = labs
    api, tenant = company
    _server(api, sender, lab, "agent1@lab.test", sender_addresses=["info@acme.com"])
    owner = _server(api, sender, lab, "agent2@lab.test", sender_addresses=["help@acme.com"])
    with pool.connection() as conn:
        inbound_messages.record(
            conn,
            [
                inbound_messages.InboundMessage(
                    tenant_id=tenant,
                    message_id="<customer-question-7@example.org>",
                    server_id=str(owner["id"]),  # the fetching server (any id will do here)
                    mailbox="help@acme.com",
                    routing_plan_id="plan-1",
                )
            ],
        )
    body = command(tenant, in_reply_to="customer-question-7@example.org")
    [result] = send(settings.amqp_url, results, body)
    assert result["status"] == "sent", result
    assert result["email_server_id"] == owner["id"]
    [mail] = lab.wait_for(1)
    assert mail.envelope_from == "help@acme.com"
    assert mail.message["In-Reply-To"] == "<customer-question-7@example.org>"


def test_template_mail_goes_to_the_default_server_until_one_is_designated(
    sender: ServiceProcess,
    labs: tuple[SmtpLab, SmtpLab],
    company: tuple[ApiClient, str],
    results: rabbit.EventTap,
    settings: Settings,
) -> None:
    lab, default_lab = labs
    api, tenant = company
    _server(api, sender, lab, "agent1@lab.test")
    body = command(tenant, kind="template", subject="Passwort zurücksetzen")
    [result] = send(settings.amqp_url, results, body)
    assert result["status"] == "sent", result
    assert result["email_server_id"] is None
    assert result["via_system_default"] is True
    [mail] = default_lab.wait_for(1)
    assert mail.envelope_from == "noreply@default.test"
    assert mail.message["Subject"] == "Passwort zurücksetzen"
    assert lab.count() == 0

    template = api.create(
        **smtp_server(
            lab,
            "agent3@lab.test",
            role="template",
            is_template_server=True,
            sender_addresses=["alerts@acme.com"],
        )
    )
    wait_known(sender, template)
    body = command(tenant, kind="template", subject="Alert")
    [result] = send(settings.amqp_url, results, body)
    assert result["status"] == "sent", result
    assert result["email_server_id"] == template["id"]
    [mail] = lab.wait_for(1)
    assert mail.login == "agent3@lab.test"
    assert mail.envelope_from == "agent3@lab.test"  # its user is an email address
    assert default_lab.count() == 1


def test_template_mail_through_the_system_default_never_sends_as_a_foreign_from(
    sender: ServiceProcess,
    labs: tuple[SmtpLab, SmtpLab],
    company: tuple[ApiClient, str],
    results: rabbit.EventTap,
    settings: Settings,
) -> None:
    """The system's relay sends as the system's address, whatever a command names."""
    lab, default_lab = labs
    api, tenant = company
    _server(api, sender, lab, "agent1@lab.test")  # a company the sender knows
    foreign = command(tenant, kind="template", **{"from": "CEO <ceo@victim.example.org>"})
    own = command(tenant, kind="template", **{"from": "Mailroom <NOREPLY@default.test>"})
    [foreign_result] = send(settings.amqp_url, results, foreign)
    [own_result] = send(settings.amqp_url, results, own)
    assert foreign_result["status"] == own_result["status"] == "sent"
    assert foreign_result["from_address"] == "noreply@default.test"
    first, second = default_lab.wait_for(2)
    for mail in (first, second):
        assert "victim" not in mail.message["From"] and "victim" not in mail.envelope_from
        assert mail.envelope_from.casefold() == "noreply@default.test"


def test_a_new_server_is_used_without_a_restart(
    sender: ServiceProcess,
    labs: tuple[SmtpLab, SmtpLab],
    company: tuple[ApiClient, str],
    results: rabbit.EventTap,
    settings: Settings,
) -> None:
    lab, _ = labs
    api, tenant = company
    api.create(**smtp_server(lab, "agent2@lab.test", sender_addresses=["new@acme.com"]))
    time.sleep(1.0)  # REQUIREMENTS: changes take effect within a second (here: by events)
    body = command(tenant, **{"from": "new@acme.com"})
    [result] = send(settings.amqp_url, results, body)
    assert result["status"] == "sent", result


# --- failures ----------------------------------------------------------------------------------


def test_451_twice_then_250_is_delivered_once_after_three_attempts(
    sender: ServiceProcess,
    labs: tuple[SmtpLab, SmtpLab],
    company: tuple[ApiClient, str],
    results: rabbit.EventTap,
    settings: Settings,
) -> None:
    lab, _ = labs
    api, tenant = company
    _server(api, sender, lab, "agent1@lab.test")
    lab.script({"slow@example.org": ["451 4.3.0 try later", "451 4.3.0 try later", "250"]})
    body = command(tenant, to=["slow@example.org"])
    found = send(settings.amqp_url, results, body, timeout=15)
    assert [(r["status"], r["final"], r["attempts"]) for r in found] == [
        ("failed", False, 1),
        ("failed", False, 2),
        ("sent", True, 3),
    ]
    assert found[0]["smtp_code"] == 451
    assert "451" in found[0]["reason"]
    assert len(lab.wait_for(1)) == 1


def test_a_retry_that_fails_for_good_dead_letters_the_command_as_it_came(
    sender: ServiceProcess,
    labs: tuple[SmtpLab, SmtpLab],
    company: tuple[ApiClient, str],
    results: rabbit.EventTap,
    settings: Settings,
    dead: DeadLetters,
) -> None:
    """The retry (dramatiq) has only the request's key: the command it dead-letters is the one
    its row kept when the first attempt had to wait."""
    lab, _ = labs
    api, tenant = company
    _server(api, sender, lab, "agent1@lab.test")
    lab.script({"gone@example.org": ["451 4.3.0 try later", "550 5.1.1 no such user"]})
    body = command(tenant, to=["gone@example.org"], subject="Ihre Anfrage ✓")
    found = send(settings.amqp_url, results, body, timeout=15)
    assert [(r["status"], r["final"], r["attempts"], r["smtp_code"]) for r in found] == [
        ("failed", False, 1, 451),
        ("failed", True, 2, 550),
    ]
    letter = dead.wait_for(body["request_id"])
    assert json.loads(letter.body) == body
    assert (letter.headers["x-smtp-code"], letter.headers["x-attempts"]) == (550, 2)
    assert lab.count() == 0


def test_a_reply_with_a_nul_character_is_recorded_as_sent(
    sender: ServiceProcess,
    labs: tuple[SmtpLab, SmtpLab],
    company: tuple[ApiClient, str],
    results: rabbit.EventTap,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
) -> None:
    """PostgreSQL's ``text`` refuses NUL: stored as it came, the reply made the accepted mail's
    record fail, and the mail ended as uncertain."""
    lab, _ = labs
    api, tenant = company
    _server(api, sender, lab, "agent1@lab.test")
    lab.script({"nul@example.org": ["250 2.0.0 queued\x00as 1"]})
    body = command(tenant, to=["nul@example.org"])
    [result] = send(settings.amqp_url, results, body)
    assert (result["status"], result["uncertain"]) == ("sent", False)
    assert result["smtp_response"] == "2.0.0 queued\ufffdas 1"
    with pool.connection() as conn:
        row = send_requests.get(conn, tenant, body["request_id"])
    assert row is not None and (row.state, row.smtp_response) == ("sent", result["smtp_response"])
    assert lab.count() == 1


def test_550_fails_at_once_and_lands_in_the_dead_letter_queue(
    sender: ServiceProcess,
    labs: tuple[SmtpLab, SmtpLab],
    company: tuple[ApiClient, str],
    results: rabbit.EventTap,
    dead: DeadLetters,
    settings: Settings,
) -> None:
    lab, _ = labs
    api, tenant = company
    _server(api, sender, lab, "agent1@lab.test")
    lab.script({"rejected@example.org": ["550 5.7.1 message refused"]})
    body = command(tenant, to=["rejected@example.org"])
    found = send(settings.amqp_url, results, body)
    assert len(found) == 1
    [result] = found
    assert (result["status"], result["final"], result["attempts"]) == ("failed", True, 1)
    assert result["smtp_code"] == 550
    assert result["smtp_response"] == "5.7.1 message refused"
    letter = dead.wait_for(body["request_id"])
    assert letter.headers["x-smtp-code"] == 550
    assert "550" in letter.headers["x-reason"]
    assert lab.count() == 0


def test_a_refused_recipient_fails_the_mail_for_all_of_its_recipients(
    sender: ServiceProcess,
    labs: tuple[SmtpLab, SmtpLab],
    company: tuple[ApiClient, str],
    results: rabbit.EventTap,
    dead: DeadLetters,
    settings: Settings,
) -> None:
    """The lab offers PIPELINING: its 354 to DATA has come by the time the refusal is read,
    and the mail must still reach nobody (a retry would otherwise deliver twice to the ones
    that were accepted). The next command is sent."""
    lab, _ = labs
    assert lab.pipelining
    api, tenant = company
    _server(api, sender, lab, "agent1@lab.test")
    lab.script({}, rcpt={"gone@example.org": "550 5.1.1 no such user"})
    body = command(tenant, to=["kept@example.org", "gone@example.org"])
    [result] = send(settings.amqp_url, results, body)
    assert (result["status"], result["final"], result["smtp_code"]) == ("failed", True, 550)
    assert "gone@example.org" in result["reason"]
    assert dead.wait_for(body["request_id"]).headers["x-smtp-code"] == 550
    after = command(tenant, to=["kept@example.org"])
    [sent] = send(settings.amqp_url, results, after)
    assert sent["status"] == "sent"
    [mail] = lab.wait_for(1)
    assert mail.message["Message-ID"] == sent["message_id"]
    assert mail.pipelined


def _password_changed_at_the_provider(
    pool: ConnectionPool[DictConnection],
    settings: Settings,
    server: dict[str, Any],
    *,
    box: SecretBox | None = None,
) -> dict[str, Any]:
    """The stored password stops working after the save (the API tests it on save): the row
    gets another one (encrypted with ``box``'s key), with the config event an admin's edit
    would send."""
    from tests.support.leaks import password

    wrong = (box or SecretBox.from_settings(settings)).encrypt(password("wrong"))
    with pool.connection() as conn, conn.transaction():
        changed = email_servers.update(conn, server["id"], {"password_encrypted": wrong})
        event = ConfigEvent(
            change="updated",
            tenant_id=changed.tenant_id,
            server_id=changed.id,
            server_type=changed.type,
            version=changed.version,
            enabled=changed.enabled,
            changed_fields=("password",),
        )
        outbox.enqueue(conn, event.routing_key, event)
    return {**server, "version": changed.version}


def test_wrong_password_is_a_final_failure_reported_to_the_status_service(
    sender: ServiceProcess,
    labs: tuple[SmtpLab, SmtpLab],
    company: tuple[ApiClient, str],
    results: rabbit.EventTap,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
) -> None:
    lab, _ = labs
    api, tenant = company
    drain(settings.amqp_url, REPORTS_QUEUE)
    server = _server(api, sender, lab, "agent1@lab.test")
    server = _password_changed_at_the_provider(pool, settings, server)
    wait_known(sender, server)
    body = command(tenant)
    [result] = send(settings.amqp_url, results, body)
    assert result["status"] == "failed" and result["final"] is True
    assert result["category"] == "authentication"
    assert result["reason"].startswith("authentication failed")
    assert result["smtp_code"] == 535
    deadline = time.monotonic() + 5
    reports: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        reports += [json.loads(b) for b, _ in drain(settings.amqp_url, REPORTS_QUEUE)]
        mine = [r for r in reports if r["server_id"] == server["id"]]
        if mine:
            break
        time.sleep(0.05)
    assert mine[0]["ok"] is False
    assert mine[0]["category"] == "authentication"
    assert mine[0]["mails_failed"] == 1
    assert mine[0]["server_type"] == "smtp"


def test_a_password_no_key_opens_makes_mail_wait_and_is_reported(
    sender: ServiceProcess,
    labs: tuple[SmtpLab, SmtpLab],
    company: tuple[ApiClient, str],
    results: rabbit.EventTap,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
) -> None:
    """A key removed too early is the server's failure to fix (enter the password again, or
    restore the key), not the mail's: it is retried, and the status service is told why."""
    lab, _ = labs
    api, tenant = company
    drain(settings.amqp_url, REPORTS_QUEUE)
    server = _server(api, sender, lab, "agent1@lab.test")
    lost_key = SecretBox([Fernet.generate_key().decode()])
    server = _password_changed_at_the_provider(pool, settings, server, box=lost_key)
    wait_known(sender, server)
    body = command(tenant)
    publish(settings.amqp_url, body)
    found = results_for(results, body["request_id"], final=False)
    assert [(r["status"], r["final"], r["category"]) for r in found] == [
        ("failed", False, "authentication")
    ]
    assert "cannot be decrypted with the configured keys" in found[0]["reason"]
    assert found[0]["email_server_id"] == server["id"]
    reports: list[dict[str, Any]] = []

    def reported() -> bool:
        drained = (json.loads(b) for b, _ in drain(settings.amqp_url, REPORTS_QUEUE))
        reports.extend(r for r in drained if r["server_id"] == server["id"])
        return bool(reports)

    eventually(reported, what="a status report")
    assert (reports[0]["ok"], reports[0]["category"]) == (False, "authentication")
    assert "cannot be decrypted" in reports[0]["reason"]
    assert lab.count() == 0

    # The admin enters the password again: the waiting mail goes out at its next attempt.
    saved = api.patch(f"/email-servers/{server['id']}", {"password": lab.users["agent1@lab.test"]})
    assert saved.status_code == 200, saved.text
    final = results_for(results, body["request_id"], timeout=15)[-1]
    assert (final["status"], final["final"]) == ("sent", True)
    assert final["attempts"] >= 2
    assert len(lab.wait_for(1)) == 1
    assert "Traceback" not in sender.log()


def test_status_report_counts_sent_mail(
    sender: ServiceProcess,
    labs: tuple[SmtpLab, SmtpLab],
    company: tuple[ApiClient, str],
    results: rabbit.EventTap,
    settings: Settings,
) -> None:
    lab, _ = labs
    api, tenant = company
    drain(settings.amqp_url, REPORTS_QUEUE)
    server = _server(api, sender, lab, "agent1@lab.test")
    bodies = [command(tenant) for _ in range(3)]
    for body in bodies:
        publish(settings.amqp_url, body)
    for body in bodies:
        results_for(results, body["request_id"])
    deadline = time.monotonic() + 5
    sent = 0
    while time.monotonic() < deadline and sent < 3:
        for raw, _ in drain(settings.amqp_url, REPORTS_QUEUE):
            report = json.loads(raw)
            if report["server_id"] == server["id"]:
                assert report["ok"] is True
                sent += report["mails_sent"]
        time.sleep(0.1)
    assert sent == 3


# --- invalid commands ----------------------------------------------------------------------


def test_invalid_commands_are_answered_and_dead_lettered_and_the_worker_goes_on(
    sender: ServiceProcess,
    labs: tuple[SmtpLab, SmtpLab],
    company: tuple[ApiClient, str],
    results: rabbit.EventTap,
    dead: DeadLetters,
    settings: Settings,
) -> None:
    lab, _ = labs
    api, tenant = company
    _server(api, sender, lab, "agent1@lab.test")
    cases = {
        "no recipient": (command(tenant, to=[]), "no recipient"),
        "unknown tenant": (command("no-such-company"), "unknown tenant 'no-such-company'"),
        "CR/LF address": (
            command(tenant, to=["a@example.org\r\nBcc: victim@example.org"]),
            "to.0: Value error, must not contain line breaks",
        ),
        "encoded newline subject": (
            command(tenant, subject="=?utf-8?q?Hi=0D=0ABcc:_x@example.org?="),
            "subject: Value error, must not contain encoded line breaks",
        ),
        "header injection by name": (
            command(tenant, headers={"Bcc": "x@example.org"}),
            "'Bcc' is set by the sender itself",
        ),
        "attachment not base64": (
            command(
                tenant,
                attachments=[
                    {"filename": "a.txt", "content_type": "text/plain", "data_base64": "***"}
                ],
            ),
            "attachments.0.data_base64: Value error, is not valid base64",
        ),
    }
    for body, _ in cases.values():
        publish(settings.amqp_url, body)
    publish(settings.amqp_url, b"{not json", content_type="text/plain")
    for name, (body, reason) in cases.items():
        [result] = results_for(results, body["request_id"])
        assert result["status"] == "failed" and result["final"] is True, name
        assert reason in result["reason"], (name, result["reason"])
        letter = dead.wait_for(body["request_id"])
        assert json.loads(letter.body) == body
    garbled = dead.wait_for("")
    assert garbled.body == b"{not json"
    assert garbled.headers["x-reason"].startswith("not JSON")
    null_results = [r.body for r in results.snapshot() if r.body.get("request_id") is None]
    assert any(r["reason"].startswith("not JSON") for r in null_results)

    # The worker is alive and well.
    body = command(tenant)
    [result] = send(settings.amqp_url, results, body)
    assert result["status"] == "sent"
    assert lab.count() == 1
    assert sender.process.poll() is None
    assert "Traceback" not in sender.log()


def test_a_command_postgresql_cannot_store_is_refused_and_its_neighbours_are_sent(
    sender: ServiceProcess,
    labs: tuple[SmtpLab, SmtpLab],
    company: tuple[ApiClient, str],
    results: rabbit.EventTap,
    dead: DeadLetters,
    settings: Settings,
) -> None:
    """Valid JSON that PostgreSQL's jsonb refuses (a NUL character, a lone surrogate), even in a
    field the sender ignores, is an invalid command: answered, dead-lettered, never retried.
    Recorded with the commands around it, it used to fail their batch again and again."""
    lab, _ = labs
    api, tenant = company
    _server(api, sender, lab, "agent1@lab.test")
    before = [command(tenant, to=[f"before{n}@example.org"]) for n in range(5)]
    after = [command(tenant, to=[f"after{n}@example.org"]) for n in range(5)]
    nul = command(tenant, text="Hello\u0000there")
    surrogate = command(tenant, subject="Hello \ud800")
    ignored = command(tenant, note={"x\u0000": "a field the sender does not read"})
    bad_id = command(tenant, request_id=f"\udc00{uuid.uuid4()}")  # answered as "?…"
    bad = {"text": nul, "subject": surrogate, "note": ignored, "request_id": bad_id}
    publish(
        settings.amqp_url,
        *before,
        *(json.dumps(body, ensure_ascii=True).encode() for body in bad.values()),
        *after,
    )
    bad_id["request_id"] = "?" + bad_id["request_id"][1:]
    for field_name, body in bad.items():
        [result] = results_for(results, body["request_id"])
        assert result["status"] == "failed" and result["category"] == "invalid_command"
        assert field_name in result["reason"], result["reason"]
        assert "NUL" in result["reason"] or "surrogate" in result["reason"], result["reason"]
        dead.wait_for(body["request_id"])
    finals = [results_for(results, body["request_id"])[-1] for body in before + after]
    assert [r["status"] for r in finals] == ["sent"] * 10
    assert [r["attempts"] for r in finals] == [1] * 10  # none was requeued behind a bad one
    assert lab.count() == 10
    assert "Traceback" not in sender.log()


def test_a_burst_of_commands_is_sent_once_each_and_leaves_no_request_locked(
    sender: ServiceProcess,
    labs: tuple[SmtpLab, SmtpLab],
    company: tuple[ApiClient, str],
    results: rabbit.EventTap,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
) -> None:
    """Commands waiting together are recorded as a batch and each mail's ``sent`` rides
    along with the next mail's statement: every one still arrives once, is recorded, and
    gives its lock back. A copy of one inside the burst changes nothing."""
    lab, _ = labs
    api, tenant = company
    _server(api, sender, lab, "agent1@lab.test")
    bodies = [command(tenant, to=[f"burst{n}@example.org"]) for n in range(120)]
    publish(settings.amqp_url, *bodies[:60], bodies[10], *bodies[60:])
    finals = [results_for(results, body["request_id"], timeout=30)[-1] for body in bodies]
    assert [r["status"] for r in finals] == ["sent"] * len(bodies)
    eventually(lambda: lab.count() >= len(bodies), timeout=5)
    time.sleep(0.5)  # a mail sent twice would arrive now
    arrived = sorted(m.recipients[0] for m in lab.mails())
    assert arrived == sorted(f"burst{n}@example.org" for n in range(120))
    request_ids = [body["request_id"] for body in bodies]
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT state, data_started_at IS NOT NULL AS marked, smtp_code,"
            " pg_try_advisory_lock(hashtextextended(%s || tenant_id || %s || request_id, 0))"
            " AS free FROM send_requests WHERE tenant_id = %s AND request_id = ANY(%s)",
            ("send\n", "\n", tenant, request_ids),
        ).fetchall()
        conn.execute("SELECT pg_advisory_unlock_all()")
    assert len(rows) == len(bodies)
    assert {(r["state"], r["marked"], r["smtp_code"], r["free"]) for r in rows} == {
        ("sent", True, 250, True)
    }


def test_a_command_published_twice_arrives_once(
    sender: ServiceProcess,
    labs: tuple[SmtpLab, SmtpLab],
    company: tuple[ApiClient, str],
    results: rabbit.EventTap,
    settings: Settings,
) -> None:
    lab, _ = labs
    api, tenant = company
    _server(api, sender, lab, "agent1@lab.test")
    body = command(tenant)
    publish(settings.amqp_url, body)
    publish(settings.amqp_url, body)
    results_for(results, body["request_id"])
    time.sleep(1.0)
    publish(settings.amqp_url, body)  # and once more, long after it was sent
    time.sleep(1.0)
    assert lab.count() == 1
    # Each copy is answered (not silence), with the one mail's result.
    answers = results_for(results, body["request_id"])
    assert [r["status"] for r in answers] == ["sent"] * 3
    assert len({(r["message_id"], r["attempts"]) for r in answers}) == 1
