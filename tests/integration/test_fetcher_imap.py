"""IMAP mail reaches its routing plan's queue: byte-identical, once, marked read, pushed."""

from __future__ import annotations

import time

import pytest
from psycopg_pool import ConnectionPool

from shared.db import fetch_state
from shared.db.pool import DictConnection
from shared.settings import Settings
from tests.lab.certs import LabCertificates
from tests.lab.dovecot import NON_ASCII_FOLDER, DovecotLab, LabUser
from tests.support.api import ApiClient
from tests.support.fetching import (
    fetcher_settings,
    lab_mailbox,
    lab_mailbox_and_queue,
    running_fetcher,
    take,
    wait_for_queue,
)
from tests.support.waiting import eventually


def sample(n: int) -> bytes:
    return (
        f"From: kunde{n}@example.org\r\nTo: support@example.com\r\n"
        f"Subject: Anfrage {n}\r\nMessage-ID: <m{n}@example.org>\r\n\r\n"
    ).encode() + b"Gr\xfc\xdfe\r\n" * n


@pytest.mark.parametrize("tls", [True, False], ids=["implicit-tls", "starttls"])
@pytest.mark.parametrize("disable_compression", [False, True], ids=["deflate", "plain"])
def test_mails_arrive_byte_identical_and_are_marked_read(
    api: ApiClient,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
    dovecot: DovecotLab,
    lab_user: LabUser,
    mail_lab_certs: LabCertificates,
    tls: bool,
    disable_compression: bool,
) -> None:
    mails = [sample(n) for n in range(1, 13)]
    for mail in mails:
        dovecot.append(lab_user.name, mail, NON_ASCII_FOLDER)
    server = lab_mailbox(
        api,
        dovecot,
        lab_user,
        tls=tls,
        inbox_folder=NON_ASCII_FOLDER,
        disable_compression=disable_compression,
    )
    queue = f"mailroom.inbound.{server['routing_plan_id']}"
    wait_for_queue(settings.amqp_url, queue)
    with running_fetcher(fetcher_settings(settings, mail_lab_certs), pool):
        delivered = take(settings.amqp_url, queue, len(mails))
        assert [d.body for d in delivered] == mails
        eventually(lambda: dovecot.unseen(lab_user.name, NON_ASCII_FOLDER) == 0, 5, "all read")
    first = delivered[0].properties
    assert first.content_type == "message/rfc822"
    assert first.delivery_mode == 2
    assert first.headers["x-tenant-id"] == "acme"
    assert first.headers["x-email-server-id"] == server["id"]
    assert first.headers["x-routing-plan-id"] == server["routing_plan_id"]
    assert first.headers["x-mailbox"] == lab_user.name
    assert first.headers["x-message-id"] == "<m1@example.org>"
    assert len({d.properties.message_id for d in delivered}) == len(mails)
    assert take(settings.amqp_url, queue, 1, timeout=0.5) == []  # nothing twice


def test_with_idle_a_new_mail_is_in_the_queue_within_two_seconds(
    api: ApiClient,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
    dovecot: DovecotLab,
    lab_user: LabUser,
    mail_lab_certs: LabCertificates,
) -> None:
    server, queue = lab_mailbox_and_queue(api, dovecot, lab_user, settings.amqp_url)
    slow_polls = fetcher_settings(settings, mail_lab_certs, imap_poll_seconds=600)
    with running_fetcher(slow_polls, pool) as fetcher:
        eventually(lambda: server["id"] in fetcher.pollers, 10, "a poller for the mailbox")
        time.sleep(1.0)  # the poller has fetched (nothing) and idles now
        latencies = []
        for n in range(3):
            appended = time.monotonic()
            dovecot.append(lab_user.name, sample(n))
            assert len(take(settings.amqp_url, queue, 1, timeout=5)) == 1
            latencies.append(time.monotonic() - appended)
    assert max(latencies) < 2.0, latencies


def test_mail_read_by_a_person_before_the_fetch_is_still_handed_over(
    api: ApiClient,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
    dovecot: DovecotLab,
    lab_user: LabUser,
    mail_lab_certs: LabCertificates,
) -> None:
    _server, queue = lab_mailbox_and_queue(api, dovecot, lab_user, settings.amqp_url)
    with running_fetcher(fetcher_settings(settings, mail_lab_certs), pool):
        dovecot.append(lab_user.name, sample(1))
        assert len(take(settings.amqp_url, queue, 1)) == 1
        uid = dovecot.append(lab_user.name, sample(2))
        dovecot.doveadm(
            "flags", "add", "-u", lab_user.name, "\\Seen", "mailbox", "INBOX", "uid", str(uid)
        )
        assert [d.body for d in take(settings.amqp_url, queue, 1)] == [sample(2)]


def test_a_server_pointed_at_another_mailbox_starts_afresh_and_skips_nothing(
    api: ApiClient,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
    dovecot: DovecotLab,
    mail_lab_certs: LabCertificates,
) -> None:
    """The second mailbox looks like the first (same UIDVALIDITY, same UIDs): the first's
    checkpoint (UID 3) would skip all of its mail."""
    first, second = dovecot.new_user("first"), dovecot.new_user("second")
    for n in (1, 2, 3):
        dovecot.append(first.name, sample(n))
    server, queue = lab_mailbox_and_queue(api, dovecot, first, settings.amqp_url)
    with running_fetcher(fetcher_settings(settings, mail_lab_certs), pool):
        assert len(take(settings.amqp_url, queue, 3)) == 3
    dovecot.set_uidvalidity(second.name, dovecot.uidvalidity(first.name))
    for n in (4, 5, 6):
        dovecot.append(second.name, sample(n))
    moved = api.patch(
        f"/email-servers/{server['id']}", {"username": second.name, "password": second.password}
    )
    assert moved.status_code == 200, moved.text
    with running_fetcher(fetcher_settings(settings, mail_lab_certs), pool):
        delivered = take(settings.amqp_url, queue, 3)
        eventually(lambda: dovecot.unseen(second.name) == 0, 5, "all read")
    assert [d.body for d in delivered] == [sample(4), sample(5), sample(6)]


def test_a_quarantined_mail_of_a_batch_committed_before_a_crash_is_flagged_on_recovery(
    api: ApiClient,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
    dovecot: DovecotLab,
    lab_user: LabUser,
    mail_lab_certs: LabCertificates,
) -> None:
    """The fetcher died after the broker took the batch, before the mail was flagged."""
    uid = dovecot.append(lab_user.name, sample(1))
    server, queue = lab_mailbox_and_queue(api, dovecot, lab_user, settings.amqp_url, enabled=False)
    identity = fetch_state.mailbox_identity(server["host"], lab_user.name, "INBOX")
    items = [{"key": f"uid:{uid}", "message_id": None, "quarantined": True}]
    with pool.connection() as conn:
        key = fetch_state.StateKey(server["id"], identity)
        uidvalidity = dovecot.uidvalidity(lab_user.name)
        batch = fetch_state.open_batch(conn, key, "INBOX", uidvalidity, items)
        fetch_state.mark_committed(conn, batch.id)
    api.patch(f"/email-servers/{server['id']}", {"enabled": True})
    with running_fetcher(fetcher_settings(settings, mail_lab_certs), pool):
        eventually(lambda: dovecot.flags(lab_user.name)[uid] == {"\\Seen", "\\Flagged"}, 5)
    assert take(settings.amqp_url, queue, 1, timeout=0.5) == []  # not handed over again
