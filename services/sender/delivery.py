"""Delivering send commands: dramatiq executes and retries, PostgreSQL makes it happen once.

**Why dramatiq, and how.** The public contract is plain JSON on ``mailroom.send`` (any AMQP
client), which dramatiq cannot read: its messages are its own envelope. So a thin kombu
consumer (:mod:`services.sender.supervisor`) validates each command, records it in
``send_requests`` and enqueues a dramatiq message ``deliver(tenant_id, request_id)`` to the
internal queue ``mailroom.sender.deliver`` (dramatiq's ``RabbitmqBroker``, publisher
confirms) before acking the command. dramatiq's worker threads run :meth:`Sender.deliver`;
its ``Retries`` middleware re-enqueues a temporarily failed delivery (raise
``dramatiq.Retry``) with exponential backoff and jitter through the ``.DQ`` delay queue. The
deadline (``MAILROOM_SENDER_RETRY_DEADLINE_SECONDS`` after the command arrived) is checked by
the delivery itself, which turns the last temporary failure into a final one. Only
``Retries`` and ``CurrentMessage`` are installed: dramatiq's default ``TimeLimit`` would
interrupt a thread in the middle of an SMTP DATA.

**Never twice (the state machine of a request).** ``received`` → ``sending`` → ``sent`` |
``failed``, with ``retry_wait`` between attempts; each step is committed before the next
network step:

1. The consumer inserts the row (``received``) and names the dramatiq message that owns it.
   The same ``request_id`` published again finds the row: if nobody has started on it yet the
   new message becomes the owner (this heals a crash between insert and enqueue), else the
   copy is dropped. A message that does not own its row does nothing.
2. A delivery thread takes a PostgreSQL advisory lock on the request (held on its connection
   for the whole attempt: if the process dies, PostgreSQL releases it) and claims the row
   (``sending``, one more attempt).
3. Just before the SMTP ``DATA`` command it commits ``data_started_at``.
4. After the server's reply it commits ``sent`` / ``failed`` / ``retry_wait``, publishes the
   result, and only then is the dramatiq message acked.

After a crash the message is delivered again and finds the row ``sending``:

- without ``data_started_at``: nothing was handed over, the attempt is simply made again;
- with it: the mail may have been accepted (the typical case: the worker died right after the
  server's 250). It is **not** sent again. The request is closed as ``failed``, final, with
  ``uncertain: true`` and a reason that says so, and kept in the dead-letter queue for a
  human. The trade-off: a crash in that window (milliseconds per mail) can lose a mail that
  was not accepted after all, but it can never deliver one twice, which is what the
  contract's "at most once" demands. A connection that breaks after DATA without a reply is
  treated the same way.

A request already ``sent``/``failed`` whose message comes again (a crash after the commit but
before the ack) publishes its final result again: results are at least once, mails at most
once.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import dramatiq
import psycopg
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.middleware import CurrentMessage, Retries
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from services.sender.connections import SmtpConnections
from services.sender.mime import MimeError, build
from services.sender.publisher import Publisher, StatusReporter
from services.sender.rate_limit import RateLimiter
from services.sender.resolver import NoRoute, Resolver, Route
from shared.contracts.send import InvalidCommand, SendCommand, SendResult
from shared.contracts.status_reports import FailureCategory
from shared.db import send_requests as repo
from shared.db.pool import DictConnection
from shared.email_servers import EmailServer
from shared.mail.smtp import SmtpError
from shared.secrets import SecretBox
from shared.server_directory import ServerDirectory
from shared.settings import Settings
from shared.topology import SENDER_DELIVERY_QUEUE_NAME

log = logging.getLogger(__name__)

ACTOR_NAME = "mailroom_sender_deliver"
UNEXPECTED_ERROR_RETRIES = 5
UNCERTAIN_REASON = (
    "delivery outcome unknown: the mail was handed to the SMTP server ({detail}) but its answer "
    "was not recorded; it is not sent again, so it arrived once or not at all"
)


def _retry_when(retries: int, exc: BaseException) -> bool:
    """A delivery asks for a retry with ``dramatiq.Retry``; a bug gets a few more tries."""
    return isinstance(exc, dramatiq.Retry) or retries < UNEXPECTED_ERROR_RETRIES


def make_broker(settings: Settings) -> RabbitmqBroker:
    return RabbitmqBroker(
        url=settings.amqp_url,
        confirm_delivery=True,
        middleware=[
            Retries(
                retry_when=_retry_when,
                min_backoff=max(1, int(settings.sender_retry_min_backoff_seconds * 1000)),
                max_backoff=max(1, int(settings.sender_retry_max_backoff_seconds * 1000)),
            ),
            CurrentMessage(),
        ],
    )


@dataclass(frozen=True)
class Accepted:
    enqueued: bool
    state: str


class Sender:
    """Everything between a validated command and its result; shared by all threads."""

    def __init__(self, settings: Settings, directory: ServerDirectory) -> None:
        self.settings = settings
        self.directory = directory
        # Autocommit: every state change is durable when its statement returns (module doc).
        self.db: ConnectionPool[DictConnection] = ConnectionPool(
            settings.database_url,
            min_size=1,
            max_size=settings.sender_threads + 2,
            connection_class=cast(type[DictConnection], psycopg.Connection),
            kwargs={"row_factory": dict_row, "autocommit": True},
            open=False,
            name="mailroom-sender",
        )
        self.db.open(wait=True, timeout=10)
        self.publisher = Publisher(settings.amqp_url)
        self.reporter = StatusReporter(self.publisher, settings.sender_status_report_seconds)
        self.connections = SmtpConnections(
            per_server=settings.sender_connections_per_server,
            idle_seconds=settings.sender_idle_close_seconds,
            timeout=settings.sender_smtp_timeout_seconds,
            ca_bundle=settings.ca_bundle,
        )
        self.limiter = RateLimiter(
            settings.redis_url, settings.sender_rate_per_minute, settings.sender_rate_burst
        )
        self.resolver = Resolver(settings, directory, self.db, SecretBox.from_settings(settings))
        self.broker = make_broker(settings)
        self.actor: dramatiq.Actor[Any, Any] = dramatiq.Actor(
            self._deliver_message,
            broker=self.broker,
            actor_name=ACTOR_NAME,
            queue_name=SENDER_DELIVERY_QUEUE_NAME,
            priority=0,
            options={},
        )
        self.stopping = threading.Event()
        self._known_tenants: set[str] = set()
        self._worker: dramatiq.Worker | None = None

    # --- running ---------------------------------------------------------------------------

    def start_worker(self) -> None:
        if self._worker is None:
            self._worker = dramatiq.Worker(self.broker, worker_threads=self.settings.sender_threads)
            self._worker.start()
            log.info("sender: %d delivery threads started", self.settings.sender_threads)

    def tick(self) -> None:
        self.connections.close_idle()
        self.reporter.flush_due()

    def close(self) -> None:
        self.stopping.set()
        if self._worker is not None:
            self._worker.stop(timeout=30_000)
            self._worker = None
        self.broker.close()
        self.connections.close()
        self.publisher.close()
        self.db.close()

    def on_server_change(self, before: EmailServer | None, after: EmailServer | None) -> None:
        if before is not None:
            self.connections.forget(before.id)

    # --- the consumer's side ---------------------------------------------------------------

    def tenant_known(self, conn: DictConnection, tenant_id: str) -> bool:
        if tenant_id in self._known_tenants:
            return True
        known = any(s.tenant_id == tenant_id for s in self.directory.all())
        known = known or repo.tenant_known(conn, tenant_id)
        if known:
            self._known_tenants.add(tenant_id)
        return known

    def accept(self, command: SendCommand, raw: dict[str, Any]) -> Accepted:
        """Record the command and hand it to a delivery thread (before the AMQP ack)."""
        message = self.actor.message(command.tenant_id, command.request_id)
        with self.db.connection() as conn:
            if not self.tenant_known(conn, command.tenant_id):
                raise InvalidCommand(
                    f"unknown tenant {command.tenant_id!r}", command.request_id, command.tenant_id
                )
            enqueue, state = repo.record_received(
                conn,
                command.tenant_id,
                command.request_id,
                raw,
                message.message_id,
                self.settings.sender_retry_deadline_seconds,
            )
        if enqueue:
            self.broker.enqueue(message)
        else:
            log.info(
                "sender: request %s of %s seen before (%s); not sent again",
                command.request_id,
                command.tenant_id,
                state,
            )
        return Accepted(enqueue, state)

    def reject_invalid(self, body: bytes, content_type: str | None, error: InvalidCommand) -> None:
        """An invalid command: kept in the dead-letter queue and answered ``failed``."""
        log.warning("sender: invalid send command (request %s): %s", error.request_id, error.reason)
        self.publisher.dead_letter(
            body,
            reason=error.reason,
            request_id=error.request_id,
            tenant_id=error.tenant_id,
            content_type=content_type,
        )
        self.publisher.result(
            SendResult(
                request_id=error.request_id,
                tenant_id=error.tenant_id,
                status="failed",
                final=True,
                reason=error.reason,
                category="invalid_command",
            )
        )

    # --- the delivery threads' side --------------------------------------------------------

    def _deliver_message(self, tenant_id: str, request_id: str) -> None:
        current = CurrentMessage.get_current_message()
        owner = current.message_id if current is not None else ""
        self.deliver(tenant_id, request_id, owner)

    def deliver(self, tenant_id: str, request_id: str, owner: str) -> None:
        with self.db.connection() as conn:
            locked, row = repo.lock_and_get(conn, tenant_id, request_id)
            if not locked:
                log.info("sender: request %s is being delivered by another thread", request_id)
                return
            try:
                self._deliver_locked(conn, row, owner)
            finally:
                repo.unlock(conn, tenant_id, request_id)

    def _deliver_locked(
        self, conn: DictConnection, row: repo.SendRequest | None, owner: str
    ) -> None:
        if row is None:
            log.warning("sender: a delivery for an unknown request; ignored")
            return
        if row.owner_message_id != owner:
            log.debug("sender: request %s has a newer message; this copy ends", row.request_id)
            return
        if row.state in ("sent", "failed"):
            self._publish_final_again(row)
            return
        if row.state == "sending" and row.data_started_at is not None:
            self._close_uncertain(conn, row, "the sender stopped before recording its answer")
            return
        command = SendCommand.model_validate(row.command)
        claimed = repo.claim(conn, row.tenant_id, row.request_id)
        try:
            route = self.resolver.resolve(command)
        except NoRoute as exc:
            self._fail(conn, claimed, None, exc.reason, category="no_route")
            return
        self.limiter.wait(route.server.id, self.stopping)
        self._attempt(conn, claimed, command, route)

    def _attempt(
        self, conn: DictConnection, row: repo.SendRequest, command: SendCommand, route: Route
    ) -> None:
        try:
            mail = build(command, route.from_mailbox, allow_smtputf8=True)
        except MimeError as exc:
            self._fail(conn, row, route, str(exc), category="invalid_command")
            return
        handed_over = False

        def before_data() -> None:
            nonlocal handed_over
            repo.mark_data_started(
                conn, row.tenant_id, row.request_id, route.server_id, mail.message_id
            )
            handed_over = True

        try:
            code, text = self.connections.send(
                route.server,
                route.password,
                mail.envelope_from,
                mail.recipients,
                mail.data,
                before_data=before_data,
                smtputf8=mail.smtputf8,
            )
        except SmtpError as exc:
            self._smtp_failed(conn, row, route, exc, handed_over=handed_over)
            return
        repo.finish(
            conn,
            row.tenant_id,
            row.request_id,
            state="sent",
            server_id=route.server_id,
            smtp_code=code,
            smtp_response=text,
        )
        self.reporter.record(route.server, ok=True, sent=True)
        self.publisher.result(
            SendResult(
                request_id=row.request_id,
                tenant_id=row.tenant_id,
                status="sent",
                email_server_id=route.server_id,
                smtp_code=code,
                smtp_response=text,
                attempts=row.attempts,
                final=True,
                message_id=mail.message_id,
                from_address=mail.envelope_from,
                via_system_default=route.system_default,
            )
        )
        log.info(
            "sender: request %s sent via %s (attempt %d)",
            row.request_id,
            route.server_id or "the system default server",
            row.attempts,
        )

    def _smtp_failed(
        self,
        conn: DictConnection,
        row: repo.SendRequest,
        route: Route,
        exc: SmtpError,
        *,
        handed_over: bool,
    ) -> None:
        no_reply = exc.code is None or exc.code < 0
        server_fault = no_reply or exc.category is not FailureCategory.PROTOCOL
        self.reporter.record(
            route.server, ok=not server_fault, sent=False, reason=exc.reason, category=exc.category
        )
        if handed_over and no_reply:
            self._close_uncertain(conn, row, exc.reason, route=route)
            return
        if exc.temporary and datetime.now(UTC) < row.deadline_at:
            repo.finish(
                conn,
                row.tenant_id,
                row.request_id,
                state="retry_wait",
                server_id=route.server_id,
                smtp_code=exc.code,
                smtp_response=exc.response,
                reason=exc.reason,
            )
            self.publisher.result(self._result(row, route, exc.reason, exc, final=False))
            log.info("sender: request %s: %s; will retry", row.request_id, exc.reason)
            raise dramatiq.Retry(exc.reason)
        reason = f"{exc.reason} (retried until the deadline)" if exc.temporary else exc.reason
        self._fail(conn, row, route, reason, error=exc)

    def _result(
        self,
        row: repo.SendRequest,
        route: Route | None,
        reason: str,
        exc: SmtpError | None,
        *,
        final: bool,
        uncertain: bool = False,
        category: str | None = None,
    ) -> SendResult:
        return SendResult(
            request_id=row.request_id,
            tenant_id=row.tenant_id,
            status="failed",
            email_server_id=route.server_id if route else None,
            smtp_code=exc.code if exc else None,
            smtp_response=exc.response if exc else None,
            attempts=row.attempts,
            final=final,
            reason=reason,
            category=category or (exc.category.value if exc else None),
            via_system_default=route.system_default if route else False,
            uncertain=uncertain,
        )

    def _fail(
        self,
        conn: DictConnection,
        row: repo.SendRequest,
        route: Route | None,
        reason: str,
        *,
        error: SmtpError | None = None,
        category: str | None = None,
        uncertain: bool = False,
    ) -> None:
        repo.finish(
            conn,
            row.tenant_id,
            row.request_id,
            state="failed",
            server_id=route.server_id if route else None,
            smtp_code=error.code if error else None,
            smtp_response=error.response if error else None,
            reason=reason,
            uncertain=uncertain,
        )
        self.publisher.dead_letter(
            json.dumps(row.command).encode(),
            reason=reason,
            request_id=row.request_id,
            tenant_id=row.tenant_id,
            smtp_code=error.code if error else None,
            smtp_response=error.response if error else None,
            attempts=row.attempts,
        )
        self.publisher.result(
            self._result(
                row, route, reason, error, final=True, uncertain=uncertain, category=category
            )
        )
        log.warning("sender: request %s failed: %s", row.request_id, reason)

    def _close_uncertain(
        self, conn: DictConnection, row: repo.SendRequest, detail: str, route: Route | None = None
    ) -> None:
        self._fail(
            conn,
            row,
            route,
            UNCERTAIN_REASON.format(detail=detail),
            category="uncertain",
            uncertain=True,
        )

    def _publish_final_again(self, row: repo.SendRequest) -> None:
        self.publisher.result(
            SendResult(
                request_id=row.request_id,
                tenant_id=row.tenant_id,
                status="sent" if row.state == "sent" else "failed",
                email_server_id=row.server_id
                if row.server_id and row.server_id != "system-default"
                else None,
                smtp_code=row.smtp_code,
                smtp_response=row.smtp_response,
                attempts=row.attempts,
                final=True,
                reason=row.reason,
                message_id=row.message_id,
                uncertain=row.uncertain,
            )
        )
