"""A command the sender keeps failing on is quarantined; the commands around it are sent.

Nothing a client can publish is known to make an attempt fail unexpectedly any more (what did,
a string PostgreSQL's ``jsonb`` refuses, is an invalid command now: test_sender_delivery). So
the fault is put into the attempt of one command here, and the sender's parts run in this
process (``services.sender.service``, on the real PostgreSQL, RabbitMQ and SMTP lab): first
attempts one after another, as a lane makes them (:func:`deliver`; a requeued command comes
again ``redelivered``), retries in the sender's own dramatiq worker (:func:`retrying`).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pika.exceptions
import psycopg
import pytest
from dramatiq.common import dq_name
from fastapi.testclient import TestClient
from psycopg_pool import ConnectionPool

from services.sender import attempt, first_attempts, mime, strikes
from services.sender.first_attempts import FirstAttempts, Job
from services.sender.service import SenderService
from services.sender.strikes import POISON_STRIKES, Strikes
from shared.contracts.send import SendCommand, SendResult, parse_command
from shared.db import send_requests
from shared.db.pool import DictConnection
from shared.settings import Settings
from shared.topology import SENDER_DELIVERY_QUEUE_NAME
from tests.lab.certs import LabCertificates
from tests.lab.smtp_server import SmtpLab
from tests.support import rabbit
from tests.support.sender import (
    DeadLetters,
    command,
    drain,
    new_tenant,
    results_for,
    results_tap,
    smtp_server,
)
from tests.support.waiting import eventually

Outcomes = dict[str, tuple[bool, list[SendResult]]]  # per request: acked?, its results
BUILD = mime.build


@pytest.fixture
def dead(settings: Settings) -> DeadLetters:
    drain(settings.amqp_url, "mailroom.send.dead")
    return DeadLetters(settings.amqp_url)


@pytest.fixture
def tenant(client: TestClient, settings: Settings, smtp_lab: SmtpLab) -> str:
    """A company with one SMTP server on the lab."""
    smtp_lab.clear()
    api, tenant = new_tenant(client, settings)
    api.create(**smtp_server(smtp_lab, "agent1@lab.test"))
    return tenant


@dataclass
class Sender:
    service: SenderService
    first: FirstAttempts
    outcomes: list[tuple[Job, bool, list[SendResult]]]

    def start_retries(self) -> None:
        self.service.retries.start(self.service.attempts)


@pytest.fixture
def sender(
    settings: Settings,
    mail_lab_certs: LabCertificates,
    pool: ConnectionPool[DictConnection],
    tenant: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Sender]:
    """The sender's parts, knowing the company's server; a command's strikes need not be ten
    seconds apart here, nor a requeued one wait."""
    monkeypatch.setattr(strikes, "POISON_MIN_SECONDS", 0.0)
    monkeypatch.setattr(first_attempts, "REQUEUE_PAUSE_SECONDS", 0.0)
    service = SenderService(
        settings.model_copy(
            update={
                "ca_bundle": mail_lab_certs.ca,
                "sender_retry_min_backoff_seconds": 0.05,
                "sender_retry_max_backoff_seconds": 0.2,
            }
        ),
        pool,
    )
    service.directory.resync_soon()
    service.directory.tick()
    outcomes: list[tuple[Job, bool, list[SendResult]]] = []
    first = FirstAttempts(
        service.db,
        service.attempts,
        Strikes(),
        service.settings.sender_retry_deadline_seconds,
        lambda job, ack, results: outcomes.append((job, ack, results)),
    )
    try:
        yield Sender(service, first, outcomes)
    finally:
        service.close()


def purge_retries(amqp_url: str) -> None:
    """Retries left by other tests' sender processes would be this worker's to make."""
    conn = rabbit.connect(amqp_url)
    try:
        for queue in (SENDER_DELIVERY_QUEUE_NAME, dq_name(SENDER_DELIVERY_QUEUE_NAME)):
            with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):  # none: empty
                conn.channel().queue_purge(queue)
    finally:
        conn.close()


@pytest.fixture
def retrying(sender: Sender, settings: Settings) -> Sender:
    """The sender with its dramatiq worker, which makes every attempt after the first."""
    purge_retries(settings.amqp_url)
    sender.start_retries()
    return sender


@pytest.fixture
def results(settings: Settings) -> Iterator[rabbit.EventTap]:
    with results_tap(settings.amqp_url) as tap:
        yield tap


def commands(tenant: str, count: int) -> list[dict[str, Any]]:
    return [command(tenant, to=[f"n{n}@example.org"]) for n in range(count)]


def deliver(sender: Sender, bodies: list[dict[str, Any]], *, redelivered: bool) -> Outcomes:
    """First attempts of the commands, one after another, as their lane makes them."""
    sender.outcomes.clear()
    for body in bodies:
        parsed, raw = parse_command(json.dumps(body).encode())
        sender.first.deliver(Job(body["request_id"], parsed, raw, redelivered))
    assert [job.message for job, _, _ in sender.outcomes] == [b["request_id"] for b in bodies]
    return {job.message: (ack, results) for job, ack, results in sender.outcomes}


def until_settled(sender: Sender, bodies: list[dict[str, Any]]) -> list[Outcomes]:
    """Rounds as the broker would bring them: first as published, then what was requeued,
    until nothing is."""
    rounds = [deliver(sender, bodies, redelivered=False)]
    while True:
        last = rounds[-1]
        requeued = [b for b in bodies if b["request_id"] in last and not last[b["request_id"]][0]]
        if not requeued:
            return rounds
        assert len(rounds) < 10, rounds
        rounds.append(deliver(sender, requeued, redelivered=True))


def row(pool: ConnectionPool[DictConnection], tenant: str, request_id: str) -> Any:
    with pool.connection() as conn:
        return send_requests.get(conn, tenant, request_id)


def test_a_command_whose_attempt_keeps_failing_is_quarantined_after_three_tries(
    sender: Sender,
    tenant: str,
    smtp_lab: SmtpLab,
    dead: DeadLetters,
    pool: ConnectionPool[DictConnection],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bodies = commands(tenant, 4)
    poison = bodies[1]["request_id"]

    def failing_build(command: SendCommand, *args: Any, **kwargs: Any) -> Any:
        if command.request_id == poison:
            raise RuntimeError("a bug met by this command only")
        return BUILD(command, *args, **kwargs)

    monkeypatch.setattr(attempt, "build", failing_build)
    rounds = until_settled(sender, bodies)

    assert [r[poison][0] for r in rounds] == [False] * 2 + [True]
    for neighbour in (bodies[0], bodies[2], bodies[3]):  # sent at once, not behind it
        outcome, [sent] = rounds[0][neighbour["request_id"]]
        assert (outcome, sent.status) == (True, "sent")
    [result] = rounds[-1][poison][1]
    assert (result.status, result.final, result.category) == ("failed", True, "internal_error")
    assert "3 times (RuntimeError: a bug met by this command only)" in (result.reason or "")
    letter = dead.wait_for(poison)
    assert json.loads(letter.body) == bodies[1]
    assert row(pool, tenant, poison).state == "failed"
    # Every other command was sent, once, and is recorded so.
    assert sorted(m.recipients[0] for m in smtp_lab.mails()) == [
        "n0@example.org",
        "n2@example.org",
        "n3@example.org",
    ]
    for body in (bodies[0], bodies[2], bodies[3]):
        assert row(pool, tenant, body["request_id"]).state == "sent"


def test_when_the_sender_fails_on_many_commands_none_is_quarantined(
    sender: Sender,
    tenant: str,
    smtp_lab: SmtpLab,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fault of the sender's own (a bug every mail meets) must not fail every mail for
    good: the commands wait, and go out once it is fixed."""
    bodies = commands(tenant, 4)

    def broken_build(command: SendCommand, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug every mail meets")

    monkeypatch.setattr(attempt, "build", broken_build)
    for round_number in range(POISON_STRIKES * 2):  # the batch as it comes back, in order
        outcomes = deliver(sender, bodies, redelivered=round_number > 0)
        assert [o for o, _ in outcomes.values()] == [False] * 4
    monkeypatch.setattr(attempt, "build", BUILD)  # fixed
    finals = deliver(sender, bodies, redelivered=True)
    assert [(o, r[0].status) for o, r in finals.values()] == [(True, "sent")] * 4
    assert smtp_lab.count() == 4


@pytest.mark.parametrize("recorded", [False, True], ids=["refused", "failed-after-commit"])
def test_a_command_whose_record_fails_does_not_hold_back_the_others(
    recorded: bool,
    sender: Sender,
    tenant: str,
    smtp_lab: SmtpLab,
    dead: DeadLetters,
    pool: ConnectionPool[DictConnection],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As a ``jsonb``-refused string did: the statement recording one command fails, after it
    took the request's lock, and (``recorded``) even after its row was committed. The command
    must take neither its own lock nor its own row for another copy's (and be dropped as one)."""
    bodies = commands(tenant, 3)
    poison = bodies[1]["request_id"]
    start = send_requests.start

    def refusing(conn: DictConnection, tenant_id: str, request_id: str, deadline: float) -> Any:
        if request_id != poison:
            return start(conn, tenant_id, request_id, deadline)
        if recorded:
            start(conn, tenant_id, request_id, deadline)
        else:
            key = send_requests.lock_key(tenant_id, request_id)
            conn.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (key,))
        raise psycopg.errors.UntranslatableCharacter("unsupported Unicode escape sequence")

    monkeypatch.setattr(send_requests, "start", refusing)
    rounds = until_settled(sender, bodies)

    first = rounds[0]
    for neighbour in (bodies[0], bodies[2]):  # sent at once
        ack, [result] = first[neighbour["request_id"]]
        assert (ack, result.status) == (True, "sent")
    assert [r[poison][0] for r in rounds] == [False] * 2 + [True]
    [result] = rounds[-1][poison][1]
    assert (result.status, result.category) == ("failed", "internal_error")
    assert "UntranslatableCharacter" in (result.reason or "")
    assert json.loads(dead.wait_for(poison).body) == bodies[1]
    if recorded:
        assert row(pool, tenant, poison).state == "failed"
    else:
        assert row(pool, tenant, poison) is None  # kept in the dead letter, though never recorded
    assert sorted(m.recipients[0] for m in smtp_lab.mails()) == ["n0@example.org", "n2@example.org"]


def test_the_database_going_away_never_counts_against_a_command(
    sender: Sender,
    tenant: str,
    smtp_lab: SmtpLab,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bodies = commands(tenant, 2)
    start = send_requests.start
    calls: list[str] = []

    def away(conn: DictConnection, tenant_id: str, request_id: str, deadline: float) -> Any:
        calls.append(request_id)
        if len(calls) <= POISON_STRIKES * 2 * len(bodies):
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return start(conn, tenant_id, request_id, deadline)

    monkeypatch.setattr(send_requests, "start", away)
    rounds = until_settled(sender, bodies)

    for body in bodies:
        outcomes = [r[body["request_id"]] for r in rounds]
        assert [ack for ack, _ in outcomes] == [False] * (POISON_STRIKES * 2) + [True]
        assert outcomes[-1][1][0].status == "sent"
    assert smtp_lab.count() == 2


# --- retries (dramatiq) ---------------------------------------------------------------------


def in_a_retry() -> bool:
    """The first attempt is made in the test's thread (:func:`deliver`), retries are not."""
    return threading.current_thread() is not threading.main_thread()


def first_attempt_fails_for_now(
    sender: Sender, smtp_lab: SmtpLab, body: dict[str, Any], *later: str
) -> SendResult:
    """The command's first attempt meets a 451 (the next ones ``later``, else a 250): its
    request waits for a retry."""
    [recipient] = body["to"]
    smtp_lab.script({recipient: ["451 4.3.0 try later", *(later or ["250"])]})
    [(outcome, [result])] = deliver(sender, [body], redelivered=False).values()
    assert (outcome, result.status, result.final) == (True, "failed", False)
    return result


def test_a_retry_waits_out_the_database_however_often_it_finds_it_away_and_sends_once(
    retrying: Sender,
    tenant: str,
    smtp_lab: SmtpLab,
    pool: ConnectionPool[DictConnection],
    results: rabbit.EventTap,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An outage ends no request, however long it lasts (here more tries than dramatiq's
    retries would once allow a bug)."""
    body = command(tenant, to=["slow@example.org"])
    request_id = body["request_id"]
    lock_and_get = send_requests.lock_and_get
    outage = 8
    tries: list[str] = []

    def away(conn: DictConnection, tenant_id: str, wanted: str) -> Any:
        if wanted == request_id and in_a_retry():
            tries.append(wanted)
            if len(tries) <= outage:
                raise psycopg.OperationalError("server closed the connection unexpectedly")
        return lock_and_get(conn, tenant_id, wanted)

    monkeypatch.setattr(send_requests, "lock_and_get", away)
    first_attempt_fails_for_now(retrying, smtp_lab, body)

    *_, final = results_for(results, request_id, timeout=20)
    assert (final["status"], final["attempts"]) == ("sent", 2)
    assert len(tries) == outage + 1
    assert row(pool, tenant, request_id).state == "sent"
    assert [m.recipients for m in smtp_lab.mails()] == [["slow@example.org"]]


def test_a_retry_whose_sent_is_not_recorded_at_first_is_recorded_and_reported_as_sent(
    retrying: Sender,
    tenant: str,
    smtp_lab: SmtpLab,
    pool: ConnectionPool[DictConnection],
    results: rabbit.EventTap,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server accepted the mail, then the statement recording that failed (a connection
    that broke): not closed as uncertain, which would tell the client "failed" for a mail
    that arrived."""
    body = command(tenant, to=["slow@example.org"])
    finish = send_requests.finish
    broken: list[str] = []

    def breaking_once(conn: DictConnection, *args: Any, **fields: Any) -> None:
        if fields.get("state") == "sent" and in_a_retry() and not broken:
            broken.append(fields["state"])
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        finish(conn, *args, **fields)

    monkeypatch.setattr(send_requests, "finish", breaking_once)
    first_attempt_fails_for_now(retrying, smtp_lab, body)

    *_, final = results_for(results, body["request_id"], timeout=20)
    assert broken == ["sent"]
    assert (final["status"], final["uncertain"], final["smtp_code"]) == ("sent", False, 250)
    assert row(pool, tenant, body["request_id"]).state == "sent"
    assert smtp_lab.count() == 1


def test_a_retry_that_keeps_failing_unexpectedly_is_closed_as_failed_and_dead_lettered(
    retrying: Sender,
    tenant: str,
    smtp_lab: SmtpLab,
    dead: DeadLetters,
    pool: ConnectionPool[DictConnection],
    results: rabbit.EventTap,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not left ``sending`` without a final result (and its message in dramatiq's own
    dead-letter queue): the client and the dead-letter queue are told, as for a first
    attempt. Its strikes travel with its message: any process may make its next retry."""
    body = command(tenant, to=["slow@example.org"])
    request_id = body["request_id"]
    failures: list[str] = []

    def failing_build(command: SendCommand, *args: Any, **kwargs: Any) -> Any:
        if in_a_retry():
            failures.append(command.request_id)
            retrying.service.retries.strikes.forget_all()  # as if made by another process
            raise RuntimeError("a bug met by this retry")
        return BUILD(command, *args, **kwargs)

    monkeypatch.setattr(attempt, "build", failing_build)
    first_attempt_fails_for_now(retrying, smtp_lab, body)

    *_, final = results_for(results, request_id, timeout=20)
    assert (final["status"], final["final"], final["category"]) == (
        "failed",
        True,
        "internal_error",
    )
    assert f"{POISON_STRIKES} times (RuntimeError: a bug met by this retry)" in final["reason"]
    assert len(failures) == POISON_STRIKES
    assert json.loads(dead.wait_for(request_id).body) == body
    assert row(pool, tenant, request_id).state == "failed"
    assert smtp_lab.count() == 0  # the first attempt's 451 delivered nothing


def test_only_strikes_in_a_row_close_a_retry_an_attempt_that_reaches_the_server_clears_them(
    retrying: Sender,
    tenant: str,
    smtp_lab: SmtpLab,
    results: rabbit.EventTap,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = command(tenant, to=["slow@example.org"])
    retries: list[str] = []
    let_through = {3, 6}  # the others fail: twice, the server's 451, twice, the server's 250

    def sometimes_failing_build(command: SendCommand, *args: Any, **kwargs: Any) -> Any:
        if in_a_retry():
            retries.append(command.request_id)
            if len(retries) not in let_through:
                raise RuntimeError("a bug met now and then")
        return BUILD(command, *args, **kwargs)

    monkeypatch.setattr(attempt, "build", sometimes_failing_build)
    first_attempt_fails_for_now(retrying, smtp_lab, body, "451 4.3.0 try later", "250")

    # The retries' results (the first attempt's goes with its command's ack, here to the test).
    found = results_for(results, body["request_id"], timeout=30)
    assert [(r["status"], r["smtp_code"]) for r in found] == [("failed", 451), ("sent", 250)]
    assert len(retries) == 6
    assert smtp_lab.count() == 1


def test_when_many_retries_fail_unexpectedly_none_is_closed_and_all_go_out_once_fixed(
    retrying: Sender,
    tenant: str,
    smtp_lab: SmtpLab,
    pool: ConnectionPool[DictConnection],
    results: rabbit.EventTap,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bodies = [command(tenant, to=[f"slow{n}@example.org"]) for n in range(2)]
    failures: dict[str, int] = {b["request_id"]: 0 for b in bodies}

    def broken_build(command: SendCommand, *args: Any, **kwargs: Any) -> Any:
        if in_a_retry():
            failures[command.request_id] += 1
            raise RuntimeError("a bug every retry meets")
        return BUILD(command, *args, **kwargs)

    monkeypatch.setattr(attempt, "build", broken_build)
    smtp_lab.script({b["to"][0]: ["451 4.3.0 try later", "250"] for b in bodies})
    outcomes = deliver(retrying, bodies, redelivered=False)
    assert [(o, r[0].final) for o, r in outcomes.values()] == [(True, False)] * 2

    eventually(
        lambda: min(failures.values()) > POISON_STRIKES * 2,
        timeout=20,
        what="each retry failing more often than a command is allowed to",
    )
    for body in bodies:
        assert row(pool, tenant, body["request_id"]).state in ("retry_wait", "sending")
    monkeypatch.setattr(attempt, "build", BUILD)  # fixed
    for body in bodies:
        *_, final = results_for(results, body["request_id"], timeout=20)
        assert (final["status"], final["final"]) == ("sent", True)
    assert sorted(m.recipients[0] for m in smtp_lab.mails()) == [
        "slow0@example.org",
        "slow1@example.org",
    ]


# --- a retry that is lost --------------------------------------------------------------------


def retries_due(pool: ConnectionPool[DictConnection], tenant: str) -> list[str]:
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT request_id FROM send_retries WHERE tenant_id = %s", (tenant,)
        ).fetchall()
    return [r["request_id"] for r in rows]


@pytest.mark.parametrize("message", ["lost", "only late"])
def test_a_request_whose_retry_does_not_come_is_taken_over_and_sent_once(
    message: str,
    sender: Sender,
    settings: Settings,
    tenant: str,
    smtp_lab: SmtpLab,
    pool: ConnectionPool[DictConnection],
    results: rabbit.EventTap,
) -> None:
    """Its dramatiq message purged by an operator, or dramatiq acked it and failed to enqueue
    it again: the request would wait for ever, without a final result. When the message was
    only late, it finds the request taken over and ends: the mail still goes out once."""
    body = command(tenant, to=["slow@example.org"])
    purge_retries(settings.amqp_url)
    first_attempt_fails_for_now(sender, smtp_lab, body)
    assert retries_due(pool, tenant) == [body["request_id"]]
    if message == "lost":
        purge_retries(settings.amqp_url)
    sweep = sender.service.retries.sweep
    sender.service.retries.start(sender.service.attempts)  # its sweep needs the attempts
    eventually(lambda: sweep(overdue_seconds=0) == 1, 5, "taken over")

    *_, final = results_for(results, body["request_id"], timeout=20)
    assert final["status"] == "sent"
    time.sleep(2)  # a late message, had it run, would have come by now
    assert smtp_lab.count() == 1
    eventually(lambda: sweep(overdue_seconds=0) == 0, 5, "swept")
    eventually(lambda: retries_due(pool, tenant) == [], 5, "a sent request is forgotten")
