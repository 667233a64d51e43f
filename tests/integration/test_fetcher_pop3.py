"""POP3 mail reaches its routing plan's queue once, and the mailbox is emptied."""

from __future__ import annotations

import poplib
import ssl
import time
from typing import Any

import pytest
from psycopg_pool import ConnectionPool

from shared.db import fetch_state
from shared.db.pool import DictConnection
from shared.settings import Settings
from tests.lab.certs import LabCertificates
from tests.lab.dovecot import DovecotLab, LabUser
from tests.support.api import ApiClient
from tests.support.fetching import (
    fetcher_settings,
    lab_mailbox_and_queue,
    running_fetcher,
    take,
)
from tests.support.waiting import eventually


def sample(n: int) -> bytes:
    body = b"..dot-stuffed line\r\n.\r\n" if n % 2 else b"plain\r\n"
    return f"Subject: POP {n}\r\nMessage-ID: <p{n}@example.org>\r\n\r\n".encode() + body


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "stls"])
def test_pop3_mails_arrive_once_and_the_mailbox_is_emptied(
    api: ApiClient,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
    dovecot: DovecotLab,
    lab_user: LabUser,
    mail_lab_certs: LabCertificates,
    tls: bool,
) -> None:
    mails = [sample(n) for n in range(1, 11)]
    for mail in mails:
        dovecot.append(lab_user.name, mail)
    _server, queue = lab_mailbox_and_queue(
        api, dovecot, lab_user, settings.amqp_url, "pop3", tls=tls
    )
    with running_fetcher(fetcher_settings(settings, mail_lab_certs), pool):
        delivered = take(settings.amqp_url, queue, len(mails))
        eventually(lambda: dovecot.count(lab_user.name) == 0, 5, "the mailbox emptied")
        time.sleep(1.2)  # two more polls: nothing is handed over again
    assert sorted(d.body for d in delivered) == sorted(mails)
    assert take(settings.amqp_url, queue, 1, timeout=0.3) == []


def test_mail_whose_deletion_was_lost_is_deleted_without_a_second_hand_over(
    api: ApiClient,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
    dovecot: DovecotLab,
    lab_user: LabUser,
    mail_lab_certs: LabCertificates,
) -> None:
    """A session that dropped before QUIT: the mail is still there, but was handed over."""
    dovecot.append(lab_user.name, sample(1))
    server, queue = lab_mailbox_and_queue(
        api, dovecot, lab_user, settings.amqp_url, "pop3", enabled=False
    )
    uidl = dovecot_uidl(dovecot, lab_user)
    key = state_key(server)
    with pool.connection() as conn:
        fetch_state.add_delivered_uidls(conn, key, [uidl], [False])
    api.patch(f"/email-servers/{server['id']}", {"enabled": True})
    with running_fetcher(fetcher_settings(settings, mail_lab_certs), pool):
        eventually(lambda: dovecot.count(lab_user.name) == 0, 5, "the mailbox emptied")
    assert take(settings.amqp_url, queue, 1, timeout=0.3) == []
    with pool.connection() as conn:
        assert fetch_state.delivered_uidls(conn, key) in ({}, {uidl: False})


def state_key(server: dict[str, Any]) -> fetch_state.StateKey:
    """Whose fetch state the fetcher keeps for ``server`` (an API answer)."""
    identity = fetch_state.mailbox_identity(server["host"], server["username"], None)
    return fetch_state.StateKey(server["id"], identity)


def dovecot_uidl(dovecot: DovecotLab, user: LabUser) -> str:
    """The UIDL Dovecot gives the user's first mail, asked over POP3S."""
    context = ssl.create_default_context(cafile=str(dovecot.certs.ca))
    client = poplib.POP3_SSL("localhost", dovecot.pop3s_port, context=context)
    try:
        client.user(user.name)
        client.pass_(user.password)
        return client.uidl(1).split()[-1].decode()
    finally:
        client.quit()


@pytest.mark.parametrize("kept", [True, False], ids=["quarantined-there", "deletion-lost-there"])
def test_a_server_pointed_at_another_mailbox_hands_over_a_mail_whose_uidl_it_knew_from_the_old(
    api: ApiClient,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
    dovecot: DovecotLab,
    mail_lab_certs: LabCertificates,
    kept: bool,
) -> None:
    """The second mailbox's mail has the UIDL of a mail the first one handed over: for the
    first mailbox, kept on the server (quarantined) or handed over with its deletion lost. In
    the second it is new: it must arrive, not be skipped or deleted unread."""
    first, second = dovecot.new_user("first"), dovecot.new_user("second")
    dovecot.append(first.name, sample(1))
    dovecot.set_uidvalidity(second.name, dovecot.uidvalidity(first.name))
    dovecot.append(second.name, sample(2))
    uidl = dovecot_uidl(dovecot, first)
    assert dovecot_uidl(dovecot, second) == uidl
    server, queue = lab_mailbox_and_queue(
        api, dovecot, first, settings.amqp_url, "pop3", enabled=False
    )
    with pool.connection() as conn:
        fetch_state.add_delivered_uidls(conn, state_key(server), [uidl], [kept])
    moved = api.patch(
        f"/email-servers/{server['id']}",
        {"username": second.name, "password": second.password, "enabled": True},
    )
    assert moved.status_code == 200, moved.text
    with running_fetcher(fetcher_settings(settings, mail_lab_certs), pool):
        delivered = take(settings.amqp_url, queue, 1)
        eventually(lambda: dovecot.count(second.name) == 0, 5, "the mailbox emptied")
    assert [d.body for d in delivered] == [sample(2)]
    assert dovecot.count(first.name) == 1  # the first mailbox is left as it was
