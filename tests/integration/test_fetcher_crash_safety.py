"""Fetchers die (SIGKILL) and scale out: every mail still arrives exactly once."""

from __future__ import annotations

import random
import time

from psycopg_pool import ConnectionPool

from shared.db.pool import DictConnection
from shared.leases import Leases
from shared.redis_client import redis_client
from shared.settings import Settings
from tests.lab.certs import LabCertificates
from tests.lab.clients import LabIMAP4_SSL, tls_context
from tests.lab.dovecot import DovecotLab, LabUser
from tests.support.api import ApiClient
from tests.support.fetching import lab_mailbox_and_queue, take
from tests.support.processes import ServiceProcess

MAILS = 500
KILLS = 10


def append_many(
    dovecot: DovecotLab, user: LabUser, certs: LabCertificates, count: int, first: int
) -> None:
    """APPEND over one IMAP session: fast (doveadm needs 40 ms a mail)."""
    client = LabIMAP4_SSL("localhost", dovecot.imaps_port, tls_context(str(certs.ca)))
    client.login(user.name, user.password)
    for n in range(first, first + count):
        mail = f"Subject: crash {n}\r\nMessage-ID: <crash-{n}@example.org>\r\n\r\nmail {n}\r\n"
        client.append("INBOX", None, None, mail.encode())
    client.logout()


def test_a_fetcher_killed_at_random_moments_hands_every_mail_over_exactly_once(
    api: ApiClient,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
    dovecot: DovecotLab,
    lab_user: LabUser,
    mail_lab_certs: LabCertificates,
) -> None:
    _server, queue = lab_mailbox_and_queue(api, dovecot, lab_user, settings.amqp_url)
    env = {
        "MAILROOM_CA_BUNDLE": str(mail_lab_certs.ca),
        "MAILROOM_FETCH_BATCH_MAILS": "5",  # many batches: kills land inside hand-overs
        "MAILROOM_MAILBOX_LEASE_SECONDS": "1",
        "MAILROOM_IMAP_POLL_SECONDS": "1",
        "MAILROOM_LOG_LEVEL": "INFO",
    }
    rng = random.Random(20261126)
    per_round = MAILS // KILLS
    kills_while_working = 0
    for round_ in range(KILLS):
        append_many(dovecot, lab_user, mail_lab_certs, per_round, first=round_ * per_round)
        waiting = dovecot.unseen(lab_user.name)
        fetcher = ServiceProcess("run", "fetcher", env=env)
        deadline = time.monotonic() + 20
        while dovecot.unseen(lab_user.name) >= waiting and time.monotonic() < deadline:
            time.sleep(0.01)  # until the hand-over has begun
        time.sleep(rng.uniform(0.0, 0.05))
        kills_while_working += dovecot.unseen(lab_user.name) > 0
        fetcher.kill()  # SIGKILL: no clean-up of any kind
    final = ServiceProcess("run", "fetcher", env=env)
    try:
        deadline = time.monotonic() + 60
        while dovecot.unseen(lab_user.name) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)  # a little longer: any duplicate would show up now
    finally:
        final.terminate()
    delivered = take(settings.amqp_url, queue, MAILS + 50, timeout=5)
    ids = [d.properties.headers["x-message-id"] for d in delivered]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} mails were handed over twice"
    assert set(ids) == {f"<crash-{n}@example.org>" for n in range(MAILS)}
    assert dovecot.unseen(lab_user.name) == 0
    assert kills_while_working >= 3, "the kills did not hit the fetcher while it worked"


def test_two_fetchers_share_mailboxes_and_one_takes_over_when_the_other_dies(
    api: ApiClient,
    settings: Settings,
    dovecot: DovecotLab,
    lab_user: LabUser,
    mail_lab_certs: LabCertificates,
) -> None:
    server, queue = lab_mailbox_and_queue(api, dovecot, lab_user, settings.amqp_url)
    env = {
        "MAILROOM_CA_BUNDLE": str(mail_lab_certs.ca),
        "MAILROOM_MAILBOX_LEASE_SECONDS": "1.5",
        "MAILROOM_LOG_LEVEL": "INFO",
    }
    fetchers = [ServiceProcess("run", "fetcher", env=env) for _ in range(2)]
    try:
        for fetcher in fetchers:
            fetcher.wait_for_log("connected to RabbitMQ, consuming", timeout=20)
        append_many(dovecot, lab_user, mail_lab_certs, 20, first=0)
        assert len(take(settings.amqp_url, queue, 20)) == 20
        leases = Leases(redis_client(settings.redis_url), "observer", 1)
        holder = leases.holder(server["id"])
        assert holder is not None
        serving = [f for f in fetchers if holder.endswith(f".{f.process.pid}")]
        assert len(serving) == 1, holder
        serving[0].kill()
        died = time.monotonic()
        append_many(dovecot, lab_user, mail_lab_certs, 5, first=20)
        assert len(take(settings.amqp_url, queue, 5, timeout=15)) == 5
        assert time.monotonic() - died < 8  # the lease ran out and the other took over
        assert take(settings.amqp_url, queue, 1, timeout=1) == []  # and nothing twice
    finally:
        for fetcher in fetchers:
            fetcher.kill()
