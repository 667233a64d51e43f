"""Hands a mailbox's mail to its routing plan's queue exactly once, whatever crashes when.

The protocol, per batch of mails of one mailbox (mailboxes are served one batch at a time):

1. The batch is written to PostgreSQL as *pending*, naming its mails.
2. The mails and a marker naming the batch are published in one AMQP transaction.
3. Once the broker committed, one PostgreSQL transaction marks the batch *committed*, moves
   the mailbox's checkpoint past its mails (IMAP) or records their UIDLs (POP3), and records
   each Message-ID's target address (for replies).
4. The poller flags the mails ``\\Seen`` (IMAP) or deletes them (POP3), and the batch is closed.

The IMAP poller keeps the broker busy (:meth:`Handover.start_next`): step 3 of one batch, the
closing of the batch before it and step 1 of the next share one transaction, and the poller
flags a batch while the broker commits the next.

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
from shared.db.fetch_state import Batch, Checkpoint, StateKey
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
        self.state_key = StateKey.of(server)  # the mailbox this session's mail comes from

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
        with self._pool.connection() as conn, conn.pipeline(), conn.transaction():
            batch = self._open(conn, mails, folder, uidvalidity)
        return self._publish(batch, mails, uidvalidity)

    def start_next(
        self,
        settling: InFlight,
        mails: list[FetchedMail],
        folder: str | None = None,
        uidvalidity: int | None = None,
        *,
        closing: Batch | None = None,
    ) -> tuple[Batch, InFlight]:
        """Step 3 of ``settling`` and steps 1 and 2 of ``mails``, for a poller that keeps the
        broker busy: returns the batch now committed (to flag while the next one publishes)
        and the next one in flight.

        One durable transaction records ``settling`` as committed, closes ``closing`` (a batch
        flagged since) and writes the next batch as pending: the broker waits for one round
        trip between two batches instead of three. Still only one batch is ever pending; a
        crash at any point leaves what :meth:`recover` settles.
        """
        batch = self._broker_committed(settling)
        with self._pool.connection() as conn, conn.pipeline(), conn.transaction():
            self._record_committed(conn, batch)
            if closing is not None:
                fetch_state.close_batch(conn, closing.id)
            following = self._open(conn, mails, folder, uidvalidity)
        return batch, self._publish(following, mails, uidvalidity)

    def complete(self, in_flight: InFlight, *, closing: Batch | None = None) -> Batch:
        """Wait for the broker, then step 3; the mails are then committed. ``closing``, a
        batch flagged meanwhile, is closed in the same transaction."""
        batch = self._broker_committed(in_flight)
        with self._pool.connection() as conn, conn.pipeline(), conn.transaction():
            fetch_state.without_waiting_for_disk(conn)
            self._record_committed(conn, batch)
            if closing is not None:
                fetch_state.close_batch(conn, closing.id)
        return batch

    def settle_quietly(self, in_flight: InFlight) -> None:
        """On the way out after a failure: let an in-flight publish end before the session
        does, whatever its outcome, so that recovery later sees what really happened."""
        try:
            self.complete(in_flight)
        except Exception:
            log.debug("server %s: an in-flight batch ended badly", self.server.id, exc_info=True)

    def finish(self, batch: Batch) -> None:
        """Step 4's end: the batch's mails are flagged or deleted (see also ``closing``)."""
        with self._pool.connection() as conn, conn.pipeline(), conn.transaction():
            fetch_state.without_waiting_for_disk(conn)
            fetch_state.close_batch(conn, batch.id)

    def message_id(self, mail: FetchedMail, uidvalidity: int | None) -> str:
        """The AMQP message id: the same for the same mail of the same mailbox, always."""
        if self.server.type is ServerType.IMAP:
            return f"{self.server.id}/{uidvalidity}/{mail.key.removeprefix('uid:')}"
        return f"{self.server.id}/pop3/{mail.key.removeprefix('uidl:')}"

    def _open(
        self,
        conn: DictConnection,
        mails: list[FetchedMail],
        folder: str | None,
        uidvalidity: int | None,
    ) -> Batch:
        """Step 1, in the caller's transaction, which must wait for the disk: a pending
        record lost in a database crash would let its mails be fetched and published again."""
        items = [
            {
                "key": m.key,
                "message_id": (
                    inbound_messages.stored_message_id(m.message_id) if m.message_id else None
                ),
                "quarantined": m.quarantine_reason is not None,
            }
            for m in mails
        ]
        return fetch_state.open_batch(conn, self.state_key, folder, uidvalidity, items)

    def _publish(self, batch: Batch, mails: list[FetchedMail], uidvalidity: int | None) -> InFlight:
        """Step 2, under way when this returns."""
        messages = [
            to_message(self.server, mail, self.message_id(mail, uidvalidity)) for mail in mails
        ]
        return InFlight(batch, self._publisher.start_batch(self.server.id, batch.id, messages))

    def _broker_committed(self, in_flight: InFlight) -> Batch:
        """Wait for the broker's commit of ``in_flight``; raise when it took none of it."""
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
        return batch

    def _commit(self, batch: Batch) -> None:
        """Step 3 on its own (recovery), without waiting for the disk: see
        :func:`fetch_state.without_waiting_for_disk`."""
        with self._pool.connection() as conn, conn.pipeline(), conn.transaction():
            fetch_state.without_waiting_for_disk(conn)
            self._record_committed(conn, batch)

    def _record_committed(self, conn: DictConnection, batch: Batch) -> None:
        """Step 3's statements, in the caller's transaction (sent in one pipeline). The state
        advanced is that of the mailbox the batch came from (it may be an earlier one)."""
        server = self.server
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
            last = max([uid_of(i) for i in batch.items], default=0)
            fetch_state.advance_checkpoint(
                conn, batch.key, Checkpoint(folder, batch.uidvalidity, last)
            )
        else:
            fetch_state.add_delivered_uidls(
                conn,
                batch.key,
                [uidl_of(i) for i in batch.items],
                [bool(i.get("quarantined")) for i in batch.items],
            )
            fetch_state.close_batch(conn, batch.id)
