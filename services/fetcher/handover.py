"""Hands a mailbox's mail to its routing plan's queue exactly once, whatever crashes when.

The protocol, per batch of mails of one mailbox (mailboxes are served one batch at a time):

1. The batch is written to PostgreSQL as *pending*, naming its mails.
2. The mails and a marker naming the batch are published in one AMQP transaction.
3. Once the broker committed, one PostgreSQL transaction marks the batch *committed*, moves
   the mailbox's checkpoint past its mails (IMAP) or records their UIDLs (POP3), and records
   each Message-ID's target address (for replies).
4. The poller flags the mails ``\\Seen`` (IMAP) or deletes them (POP3), and the batch is closed.

A crash before 2 leaves a pending batch whose marker never reached the broker: the batch is
dropped and its mails, still unread and behind the checkpoint, are fetched again. A crash
between 2 and 3 leaves a pending batch whose marker *is* the mailbox's newest: it is committed
now, without publishing again. A crash after 3 only repeats the flagging. Neither lost nor
twice, as long as RabbitMQ itself keeps what it committed.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from psycopg_pool import ConnectionPool

from services.fetcher.inbound_mail import FetchedMail, to_message
from services.fetcher.publisher import BatchOutcome, InboundPublisher
from shared.contracts.status_reports import FailureCategory
from shared.db import fetch_state, inbound_messages
from shared.db.fetch_state import Batch, Checkpoint
from shared.db.pool import DictConnection
from shared.email_servers import DEFAULT_INBOX_FOLDER, EmailServer, ServerType
from shared.mail.errors import MailServerError
from shared.topology import inbound_queue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InFlight:
    """A batch written as pending whose publish is under way."""

    batch: Batch
    outcome: Future[BatchOutcome]


def uid_of(item: dict[str, Any]) -> int:
    return int(str(item["key"]).removeprefix("uid:"))


def uidl_of(item: dict[str, Any]) -> str:
    return str(item["key"]).removeprefix("uidl:")


class Handover:
    def __init__(
        self,
        pool: ConnectionPool[DictConnection],
        publisher: InboundPublisher,
        server: EmailServer,
    ) -> None:
        self._pool = pool
        self._publisher = publisher
        self.server = server

    def recover(self) -> list[Batch]:
        """Settle the batches an earlier session left open; returns those still to flag."""
        with self._pool.connection() as conn:
            batches = fetch_state.open_batches(conn, self.server.id)
        if not batches:
            return []
        marker = self._publisher.committed_marker(self.server.id)
        to_flag = []
        for batch in batches:
            if batch.state == "pending" and batch.id != marker:
                log.info(
                    "server %s: batch %s never reached RabbitMQ; fetching its mails again",
                    self.server.id,
                    batch.id,
                )
                with self._pool.connection() as conn:
                    fetch_state.close_batch(conn, batch.id)
                continue
            if batch.state == "pending":
                log.info(
                    "server %s: batch %s reached RabbitMQ before a crash; not publishing it again",
                    self.server.id,
                    batch.id,
                )
                self._commit(batch)
            if self.server.type is ServerType.IMAP:
                to_flag.append(batch)
        return to_flag

    def deliver(
        self, mails: list[FetchedMail], folder: str | None = None, uidvalidity: int | None = None
    ) -> Batch:
        """Publish ``mails``; on return they are committed and must be flagged or deleted."""
        return self.complete(self.start(mails, folder, uidvalidity))

    def start(
        self, mails: list[FetchedMail], folder: str | None = None, uidvalidity: int | None = None
    ) -> InFlight:
        """Steps 1 and 2 without waiting for the broker; :meth:`complete` must follow."""
        items = [
            {
                "key": m.key,
                "message_id": m.message_id,
                "quarantined": m.quarantine_reason is not None,
            }
            for m in mails
        ]
        with self._pool.connection() as conn:
            batch = fetch_state.open_batch(conn, self.server.id, folder, uidvalidity, items)
        messages = [
            to_message(self.server, mail, self.message_id(mail, uidvalidity)) for mail in mails
        ]
        return InFlight(batch, self._publisher.start_batch(self.server.id, batch.id, messages))

    def complete(self, in_flight: InFlight) -> Batch:
        """Wait for the broker, then step 3; the mails are then committed."""
        batch = in_flight.batch
        outcome = self._publisher.outcome(in_flight.outcome)
        if outcome.returned:
            with self._pool.connection() as conn:
                fetch_state.close_batch(conn, batch.id)
            queue = inbound_queue(self.server.routing_plan_id or "?").name
            raise MailServerError(
                FailureCategory.UNROUTABLE,
                f"RabbitMQ has no queue {queue} for the routing plan; the mails stay unread "
                "on the server",
            )
        self._commit(batch)
        return batch

    def settle_quietly(self, in_flight: InFlight) -> None:
        """On the way out after a failure: let an in-flight publish end before the session
        does, whatever its outcome, so that recovery later sees what really happened."""
        try:
            self.complete(in_flight)
        except Exception:
            log.debug("server %s: an in-flight batch ended badly", self.server.id, exc_info=True)

    def finish(self, batch: Batch) -> None:
        with self._pool.connection() as conn, conn.transaction():
            fetch_state.without_waiting_for_disk(conn)
            fetch_state.close_batch(conn, batch.id)

    def message_id(self, mail: FetchedMail, uidvalidity: int | None) -> str:
        """The AMQP message id: the same for the same mail of the same mailbox, always."""
        if self.server.type is ServerType.IMAP:
            return f"{self.server.id}/{uidvalidity}/{mail.key.removeprefix('uid:')}"
        return f"{self.server.id}/pop3/{mail.key.removeprefix('uidl:')}"

    def _commit(self, batch: Batch) -> None:
        server = self.server
        with self._pool.connection() as conn, conn.transaction():
            fetch_state.without_waiting_for_disk(conn)
            fetch_state.mark_committed(conn, batch.id)
            if server.routing_plan_id:
                inbound_messages.record(
                    conn,
                    [
                        inbound_messages.InboundMessage(
                            tenant_id=server.tenant_id,
                            message_id=str(item["message_id"]),
                            server_id=server.id,
                            mailbox=server.username,
                            routing_plan_id=server.routing_plan_id,
                        )
                        for item in batch.items
                        if item.get("message_id")
                    ],
                )
            if server.type is ServerType.IMAP:
                assert batch.uidvalidity is not None
                folder = batch.folder or server.inbox_folder or DEFAULT_INBOX_FOLDER
                current = fetch_state.checkpoint(conn, server.id)
                same_folder = current is not None and (current.folder, current.uidvalidity) == (
                    folder,
                    batch.uidvalidity,
                )
                before = current.last_uid if current is not None and same_folder else 0
                last = max([uid_of(i) for i in batch.items] + [before])
                fetch_state.set_checkpoint(
                    conn, server.id, Checkpoint(folder, batch.uidvalidity, last)
                )
            else:
                fetch_state.add_delivered_uidls(
                    conn,
                    server.id,
                    [uidl_of(i) for i in batch.items],
                    [bool(i.get("quarantined")) for i in batch.items],
                )
                fetch_state.close_batch(conn, batch.id)
