"""Bad mail, missing queues, broken accounts and config changes never stop the fetcher."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pika
import psycopg
from alembic import command
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from shared.db import fetch_state
from shared.db.fetch_state import Checkpoint, StateKey
from shared.db.migrate import alembic_config
from shared.db.pool import DictConnection, ensure_database
from shared.email_servers import AuthType, EmailServer, ServerType
from shared.settings import Settings
from shared.topology import INBOUND_QUARANTINE_QUEUE_NAME
from tests.lab.certs import LabCertificates
from tests.lab.dovecot import DovecotLab, LabUser
from tests.support.api import ApiClient
from tests.support.fetching import (
    fetcher_settings,
    lab_mailbox,
    lab_mailbox_and_queue,
    reports_for,
    running_fetcher,
    take,
)
from tests.support.leaks import password
from tests.support.tcp import TcpProxy
from tests.support.waiting import eventually

BASE64_LINE = b"QUJD" * 19 + b"\r\n"  # 78 bytes, as base64 lines in mail are

BAD_MAILS = {
    "broken MIME": (
        b'Subject: kaputt\r\nContent-Type: multipart/mixed; boundary="nope\r\n\r\n'
        b"--wrong\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64!!!\r\n"
    ),
    "8-bit, undeclared charset": (
        b"Subject: \xc4rger \xfcber \xdf\r\nFrom: \xe9@x\r\n\r\n\xff\xfe\r\n"
    ),
    "no Message-ID": b"Subject: ohne\r\n\r\nno id\r\n",
    "empty": b"",
    "25 MB attachment": (
        b"Subject: big\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + BASE64_LINE
        * (25 * 1024 * 1024 // len(BASE64_LINE))
    ),
}


def test_bad_mail_is_delivered_raw(
    api: ApiClient,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
    dovecot: DovecotLab,
    lab_user: LabUser,
    mail_lab_certs: LabCertificates,
) -> None:
    mails = BAD_MAILS
    for mail in mails.values():
        dovecot.append(lab_user.name, mail)
    _server, queue = lab_mailbox_and_queue(api, dovecot, lab_user, settings.amqp_url)
    with running_fetcher(fetcher_settings(settings, mail_lab_certs), pool):
        delivered = take(settings.amqp_url, queue, len(mails), timeout=30)
    assert len(delivered) == len(mails)
    for (name, expected), got in zip(mails.items(), delivered, strict=True):
        assert got.body == expected, name
    assert "x-message-id" not in delivered[2].properties.headers
    assert dovecot.unseen(lab_user.name) == 0


def test_mail_above_the_size_limit_is_quarantined_and_kept_on_the_server(
    api: ApiClient,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
    dovecot: DovecotLab,
    lab_user: LabUser,
    mail_lab_certs: LabCertificates,
) -> None:
    small = b"Subject: small\r\n\r\nok\r\n"
    large = b"Subject: large\r\nMessage-ID: <big@example.org>\r\n\r\n" + b"x" * 20_000 + b"\r\n"
    dovecot.append(lab_user.name, large)
    dovecot.append(lab_user.name, small)
    server, queue = lab_mailbox_and_queue(api, dovecot, lab_user, settings.amqp_url)
    _purge(settings.amqp_url, INBOUND_QUARANTINE_QUEUE_NAME)
    with running_fetcher(fetcher_settings(settings, mail_lab_certs, max_mail_bytes=10_000), pool):
        assert [d.body for d in take(settings.amqp_url, queue, 1)] == [small]
        quarantined = take(settings.amqp_url, INBOUND_QUARANTINE_QUEUE_NAME, 1)
    assert len(quarantined) == 1
    headers = quarantined[0].properties.headers
    assert "exceeds the limit of 10000 bytes" in headers["x-quarantine-reason"]
    assert headers["x-email-server-id"] == server["id"]
    assert headers["x-message-id"] == "<big@example.org>"
    assert quarantined[0].body.startswith(b"Subject: large")
    assert b"xxxx" not in quarantined[0].body  # the header block only
    assert dovecot.count(lab_user.name) == 2  # nothing deleted
    flagged = [f for f in dovecot.flags(lab_user.name).values() if "\\Flagged" in f]
    assert len(flagged) == 1
    assert take(settings.amqp_url, queue, 1, timeout=0.5) == []


def test_unroutable_mail_stays_unread_and_the_reason_is_reported(
    api: ApiClient,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
    dovecot: DovecotLab,
    lab_user: LabUser,
    mail_lab_certs: LabCertificates,
) -> None:
    server, queue = lab_mailbox_and_queue(api, dovecot, lab_user, settings.amqp_url)
    _delete_queue(settings.amqp_url, queue)
    dovecot.append(lab_user.name, b"Subject: lost?\r\n\r\nno\r\n")
    with running_fetcher(fetcher_settings(settings, mail_lab_certs), pool):
        failures = reports_for(settings.amqp_url, server["id"], ok=False)
        assert failures and failures[0]["category"] == "unroutable"
        assert queue in failures[0]["reason"]
        assert dovecot.unseen(lab_user.name) == 1
        _declare_plan_queue(settings.amqp_url, server["routing_plan_id"])
        assert len(take(settings.amqp_url, queue, 1, timeout=10)) == 1  # after the backoff


def test_a_broken_account_does_not_stall_the_others(
    api: ApiClient,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
    dovecot: DovecotLab,
    mail_lab_certs: LabCertificates,
) -> None:
    good, bad = dovecot.new_user("good"), dovecot.new_user("bad")
    broken = lab_mailbox(api, dovecot, bad)
    # The password changes on the mail server after the save (its test passed then).
    dovecot.add_user(bad.name, password("changed by the account owner"))
    time.sleep(1.1)  # Dovecot re-reads a changed passwd-file at most once a second
    _server, queue = lab_mailbox_and_queue(api, dovecot, good, settings.amqp_url)
    dovecot.append(good.name, b"Subject: fine\r\n\r\nok\r\n")
    with running_fetcher(fetcher_settings(settings, mail_lab_certs), pool):
        assert len(take(settings.amqp_url, queue, 1)) == 1
        failure = reports_for(settings.amqp_url, broken["id"], ok=False)
    assert failure[0]["category"] == "authentication"
    assert failure[0]["reason"].startswith("authentication failed: server said")
    assert "wrong" not in failure[0]["reason"]


def test_config_changes_start_and_stop_pollers_within_a_second(
    api: ApiClient,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
    dovecot: DovecotLab,
    lab_user: LabUser,
    mail_lab_certs: LabCertificates,
) -> None:
    with running_fetcher(fetcher_settings(settings, mail_lab_certs), pool) as fetcher:
        started = time.monotonic()
        server = lab_mailbox(api, dovecot, lab_user)
        eventually(lambda: server["id"] in fetcher.pollers)
        assert time.monotonic() - started < 1.5  # create (with its connection test) + event
        first = fetcher.pollers[server["id"]]

        changed = time.monotonic()
        api.patch(f"/email-servers/{server['id']}", {"description": "renamed"})
        eventually(lambda: fetcher.pollers.get(server["id"]) not in (None, first))
        assert time.monotonic() - changed < 1.0
        eventually(lambda: not first.is_alive())

        stopped = time.monotonic()
        api.patch(f"/email-servers/{server['id']}", {"enabled": False})
        eventually(lambda: server["id"] not in fetcher.pollers)
        assert time.monotonic() - stopped < 1.0

        api.patch(f"/email-servers/{server['id']}", {"enabled": True})
        eventually(lambda: server["id"] in fetcher.pollers)
        api.delete(f"/email-servers/{server['id']}")
        eventually(lambda: server["id"] not in fetcher.pollers)


def _connection(amqp_url: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(amqp_url))


def _purge(amqp_url: str, queue: str) -> None:
    connection = _connection(amqp_url)
    channel = connection.channel()
    channel.queue_declare(queue, durable=True)
    channel.queue_purge(queue)
    connection.close()


def _delete_queue(amqp_url: str, queue: str) -> None:
    connection = _connection(amqp_url)
    connection.channel().queue_delete(queue)
    connection.close()


def _declare_plan_queue(amqp_url: str, plan: str) -> None:
    connection = _connection(amqp_url)
    channel = connection.channel()
    channel.queue_declare(f"mailroom.inbound.{plan}", durable=True)
    channel.queue_bind(f"mailroom.inbound.{plan}", "mailroom.inbound", routing_key=plan)
    connection.close()


def test_a_poller_waits_out_redis_being_away_and_fetches_again_once_it_is_back(
    api: ApiClient,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
    dovecot: DovecotLab,
    lab_user: LabUser,
    mail_lab_certs: LabCertificates,
) -> None:
    """Without Redis no lease can be taken or renewed, so the mailbox is not served (two
    fetchers could serve it at once); the poller says why and tries again, and must not die."""
    redis = TcpProxy(6379)
    redis.start()
    through_proxy = settings.redis_url.replace(":6379/", f":{redis.port}/")
    server, queue = lab_mailbox_and_queue(api, dovecot, lab_user, settings.amqp_url)
    dovecot.append(lab_user.name, b"Subject: before\r\n\r\nbefore the outage\r\n")
    fetching = fetcher_settings(settings, mail_lab_certs, redis_url=through_proxy)
    try:
        with running_fetcher(fetching, pool) as fetcher:
            before = take(settings.amqp_url, queue, 1)
            assert [m.body for m in before] == [b"Subject: before\r\n\r\nbefore the outage\r\n"]
            redis.stop()
            failure = reports_for(settings.amqp_url, server["id"], timeout=15, ok=False)
            assert failure[0]["category"] == "internal"
            assert failure[0]["reason"].startswith("Redis unavailable")
            time.sleep(3)  # several attempts to take the lease back, all refused
            redis.start()
            dovecot.append(lab_user.name, b"Subject: after\r\n\r\nafter the outage\r\n")
            after = take(settings.amqp_url, queue, 1, timeout=20)
            assert [m.body for m in after] == [b"Subject: after\r\n\r\nafter the outage\r\n"]
            assert fetcher.pollers[server["id"]].is_alive()
    finally:
        redis.stop()


def test_fetch_state_written_before_migration_0010_stays_with_the_mailbox_it_belongs_to(
    settings: Settings,
) -> None:
    """After the upgrade the fetcher finds the checkpoint, UIDLs and open batches it wrote
    before (in a database of its own, migrated to 0009 first)."""
    name = f"{_database_name(settings)}_m0010"
    url = f"{settings.database_url.rsplit('/', 1)[0]}/{name}"
    ensure_database(url)
    try:
        config = alembic_config(url)
        command.upgrade(config, "0009")
        imap = EmailServer(**_stored_server("imap", "Bücher.example", "jörg", "Eingang Ü"))
        pop3 = EmailServer(**_stored_server("pop3", "pop.example.org", "anna@example.org", None))
        with psycopg.connect(url) as conn:
            for server in (imap, pop3):
                conn.execute(
                    "INSERT INTO email_servers (id, tenant_id, type, name, host, tls, auth_type,"
                    " username, inbox_folder, enabled) VALUES (%s, 'acme', %s, 'x', %s, true,"
                    " 'basic', %s, %s, true)",
                    (
                        server.id,
                        server.type.value,
                        server.host,
                        server.username,
                        server.inbox_folder,
                    ),
                )
            conn.execute(
                "INSERT INTO imap_checkpoints (server_id, folder, uidvalidity, last_uid)"
                " VALUES (%s, 'Eingang Ü', 7, 42)",
                (imap.id,),
            )
            conn.execute(
                "INSERT INTO pop3_delivered (server_id, uidl, kept) VALUES (%s, 'u1', true)",
                (pop3.id,),
            )
            for server in (imap, pop3):
                conn.execute(
                    "INSERT INTO fetch_batches (id, server_id, items, state)"
                    " VALUES (gen_random_uuid(), %s, '[]', 'committed')",
                    (server.id,),
                )
        command.upgrade(config, "head")
        with psycopg.connect(url, row_factory=dict_row) as conn:
            assert fetch_state.checkpoint(conn, StateKey.of(imap)) == Checkpoint("Eingang Ü", 7, 42)
            assert fetch_state.delivered_uidls(conn, StateKey.of(pop3)) == {"u1": True}
            for server in (imap, pop3):
                (batch,) = fetch_state.open_batches(conn, server.id)
                assert batch.key == StateKey.of(server)
    finally:
        admin = make_conninfo(settings.database_url, dbname="postgres")
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


def _database_name(settings: Settings) -> str:
    return str(conninfo_to_dict(settings.database_url)["dbname"])


def _stored_server(kind: str, host: str, user: str, folder: str | None) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "tenant_id": "acme",
        "type": ServerType(kind),
        "name": "x",
        "host": host,
        "tls": True,
        "auth_type": AuthType.BASIC,
        "enabled": True,
        "version": 1,
        "username": user,
        "inbox_folder": folder,
    }
