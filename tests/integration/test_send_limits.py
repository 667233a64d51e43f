"""Bounded send commands, through the real sender (RabbitMQ, PostgreSQL, the aiosmtpd lab).

A sender runs with small limits. Each command over one, published between commands within
them, gets one final ``failed`` result naming the limit and its setting, and lands in
``mailroom.send.dead`` byte for byte; the commands after it are sent at their first attempt.
Ids, reasons and server replies too large for an AMQP frame are cut, so that neither the
result nor the dead letter is refused by the broker (which would requeue the command for
ever).
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from shared.contracts.send import ID_MAX_CHARS, TEXT_MAX_CHARS
from shared.mail.smtp import SMTP_REPLY_CHARACTERS
from shared.settings import Settings
from tests.lab.certs import LabCertificates
from tests.lab.smtp_server import SmtpLab
from tests.support import rabbit
from tests.support.processes import ServiceProcess
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

LIMITS = {
    "MAILROOM_SEND_MAX_COMMAND_BYTES": str(512 * 1024),  # above frame_max: ids and reasons fit
    "MAILROOM_SEND_MAX_RECIPIENTS": "5",
    "MAILROOM_SEND_MAX_ATTACHMENTS": "2",
    "MAILROOM_SEND_MAX_ATTACHMENT_BYTES": "1000",
    "MAILROOM_SEND_MAX_HEADERS": "3",
    "MAILROOM_SEND_MAX_HEADER_BYTES": "100",
}
FRAME_MAX = 128 * 1024  # RabbitMQ's frame_max: one frame holds a message's whole header table


@pytest.fixture(scope="module")
def sender(
    mail_lab_certs: LabCertificates, smtp_lab: SmtpLab, smtp_default_lab: SmtpLab
) -> Iterator[ServiceProcess]:
    process = start_sender(sender_env(mail_lab_certs, smtp_default_lab, **LIMITS))
    try:
        yield process
    finally:
        process.terminate()


@pytest.fixture
def lab(smtp_lab: SmtpLab) -> SmtpLab:
    smtp_lab.clear()
    return smtp_lab


@pytest.fixture
def dead(settings: Settings) -> DeadLetters:
    drain(settings.amqp_url, "mailroom.send.dead")
    return DeadLetters(settings.amqp_url)


@pytest.fixture
def tenant(client: TestClient, settings: Settings, sender: ServiceProcess, lab: SmtpLab) -> str:
    """A company with one SMTP server on the lab, known to the running sender."""
    api, tenant = new_tenant(client, settings)
    server = api.create(**smtp_server(lab, "agent1@lab.test"))
    wait_known(sender, server)
    return tenant


def _file(size: int) -> dict[str, str]:
    return {
        "filename": "a.bin",
        "content_type": "application/octet-stream",
        "data_base64": base64.encodebytes(b"\xff" * size).decode(),
    }


def _over_each_limit(tenant: str) -> dict[str, tuple[bytes, str]]:
    """A body over each limit, and the start of the reason it must be answered with."""
    ten = [f"r{n}@example.org" for n in range(10)]
    cases: dict[str, tuple[dict[str, Any], str]] = {
        "recipients": (
            command(tenant, to=ten[:3], cc=ten[3:5], bcc=ten[5:6]),
            "the command has 6 recipients; at most 5 are allowed (MAILROOM_SEND_MAX_RECIPIENTS)",
        ),
        "attachments": (
            command(tenant, attachments=[_file(10)] * 3),
            "the command has 3 attachments; at most 2 are allowed (MAILROOM_SEND_MAX_ATTACHMENTS)",
        ),
        "attachment size": (
            command(tenant, attachments=[_file(10), _file(1001)]),
            "attachments.1 is 1,001 bytes (decoded); at most 1,000 are allowed"
            " (MAILROOM_SEND_MAX_ATTACHMENT_BYTES)",
        ),
        "headers": (
            command(tenant, headers={f"X-Tag-{n}": "v" for n in range(4)}),
            "the command has 4 headers; at most 3 are allowed (MAILROOM_SEND_MAX_HEADERS)",
        ),
        "header length": (
            command(tenant, headers={"X-Long": "v" * 95}),
            "the header 'X-Long' is 101 bytes (name and value); at most 100 are allowed"
            " (MAILROOM_SEND_MAX_HEADER_BYTES)",
        ),
    }
    bodies = {name: (json.dumps(body).encode(), reason) for name, (body, reason) in cases.items()}
    size = command(tenant, text="x" * (512 * 1024))
    encoded = json.dumps(size).encode()
    bodies["command size"] = (
        encoded,
        f"the command is {len(encoded):,} bytes; at most 524,288 are allowed"
        " (MAILROOM_SEND_MAX_COMMAND_BYTES)",
    )
    return bodies


def test_each_limit_exceeded_is_answered_and_dead_lettered_and_the_next_commands_are_sent(
    sender: ServiceProcess,
    lab: SmtpLab,
    tenant: str,
    results: rabbit.EventTap,
    dead: DeadLetters,
    settings: Settings,
) -> None:
    over = _over_each_limit(tenant)
    within = [command(tenant, to=[f"within{n}@example.org"]) for n in range(len(over) + 1)]
    within[0].update(  # at every limit, not over it
        cc=["c1@example.org", "c2@example.org"],
        bcc=["b1@example.org", "b2@example.org"],
        attachments=[_file(1000), _file(1000)],
        headers={"X-A": "1", "X-B": "2", "X-Long": "v" * 94},
    )
    bodies: list[bytes] = [json.dumps(within[0]).encode()]
    for (body, _), after in zip(over.values(), within[1:], strict=True):
        bodies += [body, json.dumps(after).encode()]
    publish(settings.amqp_url, *bodies)

    for name, (body, reason) in over.items():
        request_id = json.loads(body)["request_id"]
        [result] = results_for(results, request_id)
        assert (result["status"], result["final"]) == ("failed", True), name
        assert (result["category"], result["tenant_id"]) == ("invalid_command", tenant), name
        assert result["reason"] == reason, name
        letter = dead.wait_for(request_id)
        assert letter.body == body, name  # as it came, byte for byte
        assert letter.headers["x-reason"] == reason, name
    finals = [results_for(results, body["request_id"])[-1] for body in within]
    assert [(r["status"], r["attempts"]) for r in finals] == [("sent", 1)] * len(within)
    mails = lab.wait_for(len(within))
    assert len(mails) == len(within)  # nothing of a refused command reached the server
    [at_limits] = [mail for mail in mails if "within0@example.org" in mail.recipients]
    assert len(at_limits.recipients) == 5
    assert len(list(at_limits.message.iter_attachments())) == 2
    assert sender.process.poll() is None
    assert "Traceback" not in sender.log()


def _memory(pid: int) -> tuple[int, int]:
    """A process's resident memory now and at its peak, in bytes (Linux)."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def test_a_command_over_the_size_limit_costs_the_sender_no_copy_of_its_own(
    sender: ServiceProcess,
    tenant: str,
    results: rabbit.EventTap,
    dead: DeadLetters,
    settings: Settings,
) -> None:
    """64 MiB, 128 times the limit, and invalid besides: refused for its size before it is
    decoded or parsed. The sender's peak memory grows by twice its size: py-amqp holds the
    body's frames and then joins them, for a moment both. Decoding and parsing it would add a
    third (measured: 3.0 times its size without the check, 2.0 with it)."""
    body = command(tenant, to=[], text="x" * (64 * 1024 * 1024))
    encoded = json.dumps(body).encode()
    resident, _ = _memory(sender.process.pid)
    publish(settings.amqp_url, encoded)
    [result] = results_for(results, body["request_id"], timeout=60)
    _, peak = _memory(sender.process.pid)
    assert result["reason"].startswith(f"the command is {len(encoded):,} bytes;")
    assert dead.wait_for(body["request_id"], timeout=30).body == encoded
    assert peak - resident < 2.5 * len(encoded), f"{(peak - resident) / len(encoded):.1f} times"


def test_ids_and_reasons_too_large_for_a_frame_are_cut_and_the_command_is_answered_once(
    sender: ServiceProcess,
    lab: SmtpLab,
    tenant: str,
    results: rabbit.EventTap,
    dead: DeadLetters,
    settings: Settings,
) -> None:
    """A 200 KB request_id or reason in a header would be refused by the broker (FRAME_ERROR):
    the invalid command was requeued and came back for ever."""
    huge_id = "r" * 200_000
    huge_address = "x" * 200_000 + "@"  # not an address: the reason quotes it
    marker = uuid.uuid4().hex
    bad = [
        command(tenant, request_id=huge_id, subject=marker),
        command(tenant, to=[huge_address]),
    ]
    after = command(tenant, to=["after@example.org"])
    publish(settings.amqp_url, *bad, after)

    cut_id = "r" * ID_MAX_CHARS + "…"
    [result] = results_for(results, cut_id)
    assert (result["status"], result["final"]) == ("failed", True)
    assert "request_id: String should have at most 255 characters" in result["reason"]
    letter = dead.wait_for(cut_id)
    assert marker.encode() in letter.body and len(letter.body) > FRAME_MAX  # whole, as it came

    [result] = results_for(results, bad[1]["request_id"])
    assert result["status"] == "failed"
    assert len(result["reason"]) == TEXT_MAX_CHARS + 1 and result["reason"].endswith("…")
    letter = dead.wait_for(bad[1]["request_id"])
    assert letter.headers["x-reason"] == result["reason"]

    [sent] = results_for(results, after["request_id"])
    assert (sent["status"], sent["attempts"]) == ("sent", 1)
    results.wait_for(lambda r: r.body.get("request_id") == cut_id, timeout=1)
    assert len([r for r in results.snapshot() if r.body.get("request_id") == cut_id]) == 1
    assert len(dead.for_request(cut_id)) == 1  # answered once: never requeued
    assert "requeued" not in sender.log()


def test_a_server_reply_too_large_for_a_frame_is_cut_in_the_result_and_the_dead_letter(
    sender: ServiceProcess,
    lab: SmtpLab,
    tenant: str,
    results: rabbit.EventTap,
    dead: DeadLetters,
    settings: Settings,
) -> None:
    """A 550 of 200 KB (many lines): the reason and the reply in a dead letter's headers."""
    lines = [f"550-5.7.1 {n:03d} " + "z" * 4000 for n in range(50)]
    lab.script({"refused@example.org": ["\r\n".join([*lines, "550 5.7.1 refused"])]})
    body = command(tenant, to=["refused@example.org"])
    after = command(tenant, to=["after@example.org"])
    publish(settings.amqp_url, body, after)

    letter = dead.wait_for(body["request_id"])
    assert json.loads(letter.body) == body
    assert letter.headers["x-smtp-code"] == 550
    [result] = results_for(results, body["request_id"])
    assert (result["status"], result["final"], result["smtp_code"]) == ("failed", True, 550)
    # The server's words are cut where they are read (shared.mail.errors.excerpt), long before
    # a result or a header could outgrow a frame.
    assert len(result["smtp_response"]) == SMTP_REPLY_CHARACTERS
    assert result["smtp_response"].endswith("…") and result["reason"].endswith("…")
    assert len(result["reason"]) <= TEXT_MAX_CHARS
    assert letter.headers["x-smtp-response"] == result["smtp_response"]
    assert letter.headers["x-reason"] == result["reason"]
    assert [r["status"] for r in results_for(results, after["request_id"])] == ["sent"]
    assert "Traceback" not in sender.log()


def test_a_dead_letter_its_reader_refuses_is_dropped_never_sent_back(
    sender: ServiceProcess,
    tenant: str,
    results: rabbit.EventTap,
    dead: DeadLetters,
    settings: Settings,
) -> None:
    """``mailroom.send.dead`` is declared without a dead-letter exchange (shared/topology.py):
    a dead letter stays until someone takes it, and one refused there is gone, not brought
    back to ``mailroom.send`` to be refused again."""
    body = command(tenant, to=[f"r{n}@example.org" for n in range(6)])
    publish(settings.amqp_url, body)
    results_for(results, body["request_id"])
    conn = rabbit.connect(settings.amqp_url)
    try:
        channel = conn.channel()
        # Declared again without arguments: one the queue had (a dead-letter exchange, say)
        # would make this an inequivalent declare, which closes the channel.
        channel.queue_declare("mailroom.send.dead", durable=True, arguments={})
        for _ in range(100):
            method, properties, _ = channel.basic_get("mailroom.send.dead", auto_ack=False)
            if method is not None:
                break
            conn.sleep(0.05)
        assert method is not None and properties.headers["x-request-id"] == body["request_id"]
        channel.basic_reject(method.delivery_tag, requeue=False)
        conn.sleep(1.0)  # time for it to come back, if it could
        left = channel.queue_declare("mailroom.send.dead", durable=True, passive=True)
        assert left.method.message_count == 0
    finally:
        conn.close()
    answers = [r for r in results.snapshot() if r.body.get("request_id") == body["request_id"]]
    assert len(answers) == 1
