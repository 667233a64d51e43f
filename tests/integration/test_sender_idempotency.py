"""Never twice: a sender killed right after DATA, and a command from a client that knows
nothing of Mailroom but the contract (raw pika, in a script that imports nothing of ours)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from fastapi.testclient import TestClient
from psycopg_pool import ConnectionPool

from shared.db import send_requests
from shared.db.pool import DictConnection
from shared.settings import Settings
from tests.lab.certs import LabCertificates
from tests.lab.smtp_server import SmtpLab
from tests.support import rabbit
from tests.support.sender import (
    DeadLetters,
    command,
    drain,
    new_tenant,
    publish,
    results_for,
    sender_env,
    smtp_server,
    start_sender,
    wait_known,
)
from tests.support.waiting import eventually


def test_a_sender_killed_right_after_data_never_sends_twice(
    mail_lab_certs: LabCertificates,
    smtp_lab: SmtpLab,
    smtp_default_lab: SmtpLab,
    client: TestClient,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
    results: rabbit.EventTap,
) -> None:
    smtp_lab.clear()
    drain(settings.amqp_url, "mailroom.send.dead")
    env = sender_env(mail_lab_certs, smtp_default_lab)
    api, tenant = new_tenant(client, settings)
    first = start_sender(env)
    try:
        server = api.create(**smtp_server(smtp_lab, "agent1@lab.test"))
        wait_known(first, server)
        # The server stores the mail, then answers 250 only after 3 s: time to kill the sender.
        smtp_lab.script({"once@example.org": [{"reply": "250", "delay": 3}]})
        body = command(tenant, to=["once@example.org"])
        publish(settings.amqp_url, body)
        assert len(smtp_lab.wait_for(1, timeout=10)) == 1
        first.process.kill()
        first.process.wait(5)
    finally:
        first.kill()
    with pool.connection() as conn:
        row = send_requests.get(conn, tenant, body["request_id"])
    assert row is not None
    assert row.state == "sending" and row.data_started_at is not None

    second = start_sender(env)
    try:
        [result] = results_for(results, body["request_id"], timeout=15)
        assert result["status"] == "failed"
        assert result["final"] is True
        assert result["uncertain"] is True
        assert "not sent again" in result["reason"]
        letter = DeadLetters(settings.amqp_url).wait_for(body["request_id"])
        assert letter.headers["x-reason"] == result["reason"]
        assert json.loads(letter.body) == body  # the redelivered command: its row keeps none
        # Long enough for any retry to have happened: the mail is still there once.
        smtp_lab.script({})
        later = command(tenant, to=["after@example.org"])
        publish(settings.amqp_url, later)
        results_for(results, later["request_id"])
        assert [m.recipients for m in smtp_lab.mails()] == [
            ["once@example.org"],
            ["after@example.org"],
        ]
    finally:
        second.terminate()


def test_database_connections_cut_during_a_burst_lose_no_command_and_send_none_twice(
    mail_lab_certs: LabCertificates,
    smtp_lab: SmtpLab,
    smtp_default_lab: SmtpLab,
    client: TestClient,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
    results: rabbit.EventTap,
) -> None:
    """PostgreSQL drops the sender's sessions (and with them its request locks) while mails
    flow: the batches in hand are requeued and every command still ends with one final
    result; a mail whose ``sent`` was not recorded yet is closed as uncertain, never resent."""
    smtp_lab.clear()
    api, tenant = new_tenant(client, settings)
    sender = start_sender(sender_env(mail_lab_certs, smtp_default_lab))
    try:
        server = api.create(**smtp_server(smtp_lab, "agent1@lab.test"))
        wait_known(sender, server)
        bodies = [command(tenant, to=[f"cut{n}@example.org"]) for n in range(150)]
        publish(settings.amqp_url, *bodies)
        eventually(lambda: smtp_lab.count() >= 20, timeout=20, what="20 mails sent")
        with pool.connection() as conn:
            cut = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity"
                " WHERE application_name = 'mailroom-sender'"
            ).fetchone()
        assert cut is not None and cut["n"] >= 1
        finals = {
            body["request_id"]: results_for(results, body["request_id"], timeout=40)[-1]
            for body in bodies
        }
    finally:
        sender.terminate()
    arrived = [m.recipients[0] for m in smtp_lab.mails()]
    assert len(arrived) == len(set(arrived)), "a mail arrived twice"
    by_recipient = {body["to"][0]: finals[body["request_id"]] for body in bodies}
    for recipient, final in by_recipient.items():
        if final["status"] == "sent":
            assert recipient in arrived
        else:  # only the one mail in flight when its record was lost
            assert final["uncertain"] is True, final
    assert sum(final["status"] == "sent" for final in finals.values()) >= len(bodies) - 8


STANDALONE_CLIENT = textwrap.dedent(
    """
    import json, sys, uuid
    import pika

    url, tenant, request_id = sys.argv[1:4]
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()
    command = {
        "request_id": request_id,
        "tenant_id": tenant,
        "kind": "agent",
        "from": "agent1@lab.test",
        "to": ["Ann <ann@example.org>"],
        "cc": [],
        "bcc": [],
        "reply_to": None,
        "subject": "From a plain pika script",
        "text": "hello",
        "html": None,
        "headers": {},
        "attachments": [],
        "in_reply_to": None,
    }
    channel.basic_publish(
        exchange="",
        routing_key="mailroom.send",
        body=json.dumps(command),
        properties=pika.BasicProperties(delivery_mode=2),
    )
    connection.close()
    assert not any(name.startswith(("shared", "services", "tests")) for name in sys.modules)
    """
)


def test_a_command_from_a_raw_pika_script_is_delivered(
    mail_lab_certs: LabCertificates,
    smtp_lab: SmtpLab,
    smtp_default_lab: SmtpLab,
    client: TestClient,
    settings: Settings,
    results: rabbit.EventTap,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    smtp_lab.clear()
    api, tenant = new_tenant(client, settings)
    sender = start_sender(sender_env(mail_lab_certs, smtp_default_lab))
    try:
        server = api.create(**smtp_server(smtp_lab, "agent1@lab.test"))
        wait_known(sender, server)
        script = tmp_path_factory.mktemp("client") / "publish.py"
        script.write_text(STANDALONE_CLIENT)
        request_id = "raw-pika-1"
        # -I: isolated mode; the script's directory is a fresh one, so no project module is
        # importable (the script asserts it imported none).
        subprocess.run(
            [sys.executable, "-I", str(script), settings.amqp_url, tenant, request_id],
            check=True,
            cwd=script.parent,
            timeout=30,
        )
        [result] = results_for(results, request_id)
        assert result["status"] == "sent"
        assert result["email_server_id"] == server["id"]
        [mail] = smtp_lab.wait_for(1)
        assert mail.message["Subject"] == "From a plain pika script"
    finally:
        sender.terminate()
