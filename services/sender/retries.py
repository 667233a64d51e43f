"""Every attempt after the first: a dramatiq actor on the internal queue
``mailroom.sender.deliver``.

A request waiting for a retry (``retry_wait``) is owned by one dramatiq message
(``owner_message_id``): an older copy that comes ends on the owner check. dramatiq's
``Retries`` middleware enqueues the message again after a temporary failure
(``dramatiq.Retry``), with exponential backoff and jitter, without a limit on the count: the
request's deadline ends it (``services.sender.attempt``). Only ``Retries`` and
``CurrentMessage`` are installed: dramatiq's default ``TimeLimit`` would interrupt a thread in
the middle of an SMTP DATA.

An unexpected failure counts against the request (``services.sender.strikes``), its strikes
carried in the message's options (any process may make its next retry). A service that is
away never counts: its retry is retried for as long as it is away.

A retry that never comes (its message purged, a re-enqueue that failed after dramatiq acked)
is found by :meth:`Retries.sweep`: every retry scheduled records when it is due
(``send_retries``), and a request overdue by the longest backoff is taken over by a new
message. The sweep also closes what no command or message will move on any more: a request
still ``sending``, unlocked, after its deadline (its command was lost before its first attempt
ended: a publish the broker did not keep).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.common import compute_backoff
from dramatiq.middleware import CurrentMessage
from dramatiq.middleware import Retries as RetriesMiddleware
from psycopg_pool import ConnectionPool

from services.sender.attempt import Attempts
from services.sender.first_attempts import POISON_REASON
from services.sender.strikes import Strikes, blameable
from services.sender.work import release_locks
from shared.contracts.send import SendCommand
from shared.db import send_requests as repo
from shared.db.pool import DictConnection
from shared.settings import Settings
from shared.topology import SENDER_DELIVERY_QUEUE_NAME

log = logging.getLogger(__name__)

ACTOR_NAME = "mailroom_sender_deliver"
STRIKES_OPTION = "mailroom_strikes"  # [strikes in a row, the first one's time]
BUSY_RETRY_MILLISECONDS = 1000
SWEEP_SECONDS = 60.0
SWEEP_GRACE_SECONDS = 300.0  # how overdue a retry must be (at least the longest backoff)

_serving: list[Retries] = []  # the process's retries, for the actor (one, once started)


def deliver_retry(tenant_id: str, request_id: str) -> None:
    """The actor: the next attempt of a request."""
    assert _serving, "the sender's retries are not started"
    _serving[-1].deliver_current(tenant_id, request_id)


def _milliseconds(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class Retries:
    """The actor's broker and worker threads, the schedule of new retries, the sweep."""

    def __init__(self, settings: Settings, db: ConnectionPool[DictConnection]) -> None:
        self._settings = settings
        self._db = db
        self.max_backoff_seconds = settings.sender_retry_max_backoff_seconds
        self.broker = RabbitmqBroker(
            url=settings.amqp_url,
            confirm_delivery=True,
            middleware=[
                RetriesMiddleware(
                    max_retries=None,
                    min_backoff=_milliseconds(settings.sender_retry_min_backoff_seconds),
                    max_backoff=_milliseconds(settings.sender_retry_max_backoff_seconds),
                ),
                CurrentMessage(),
            ],
        )
        self.actor: dramatiq.Actor[Any, Any] = dramatiq.Actor(
            deliver_retry,
            broker=self.broker,
            actor_name=ACTOR_NAME,
            queue_name=SENDER_DELIVERY_QUEUE_NAME,
            priority=0,
            options={},
        )
        self.strikes = Strikes(window=2 * settings.sender_retry_max_backoff_seconds)
        self._grace = max(SWEEP_GRACE_SECONDS, settings.sender_retry_max_backoff_seconds)
        self._swept_at = time.monotonic()
        self._attempts: Attempts | None = None
        self._worker: dramatiq.Worker | None = None
        self._lock = threading.Lock()

    # --- the schedule (services.sender.attempt.Scheduler) ----------------------------------

    def new_owner(self, tenant_id: str, request_id: str) -> dramatiq.Message[Any]:
        # retries=1: dramatiq's backoff goes on where the first attempt's left off.
        return self.actor.message_with_options(args=(tenant_id, request_id), retries=1)

    def enqueue(self, message: dramatiq.Message[Any], delay_ms: int) -> None:
        self.broker.enqueue(message, delay=delay_ms)

    def first_backoff_ms(self) -> int:
        """dramatiq's backoff for retry 0, with jitter."""
        _, delay = compute_backoff(
            0,
            factor=_milliseconds(self._settings.sender_retry_min_backoff_seconds),
            max_backoff=_milliseconds(self._settings.sender_retry_max_backoff_seconds),
        )
        return int(delay)

    # --- running ---------------------------------------------------------------------------

    def start(self, attempts: Attempts) -> None:
        with self._lock:
            self._attempts = attempts
            _serving[:] = [self]
            if self._worker is None:
                threads = self._settings.sender_retry_threads
                self._worker = dramatiq.Worker(self.broker, worker_threads=threads)
                self._worker.start()
                log.info("sender: %d retry threads (dramatiq) started", threads)

    def stop(self) -> None:
        with self._lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.stop(timeout=30_000)
        self.broker.close()

    # --- one retry -------------------------------------------------------------------------

    def deliver_current(self, tenant_id: str, request_id: str) -> None:
        current = CurrentMessage.get_current_message()
        owner = current.message_id if current is not None else ""
        try:
            self.deliver(tenant_id, request_id, owner)
        except dramatiq.Retry:
            if current is not None:
                current.options.pop(STRIKES_OPTION, None)  # it met no fault of ours
            raise
        except Exception as exc:
            if current is None or not blameable(exc) or not self._struck(current, exc):
                raise  # retried by dramatiq, with its backoff

    def deliver(self, tenant_id: str, request_id: str, owner: str) -> None:
        attempts = self._attempts
        assert attempts is not None
        with self._db.connection() as conn:
            try:
                locked, row = repo.lock_and_get(conn, tenant_id, request_id)
                if not locked:
                    log.info("sender: request %s is being delivered elsewhere", request_id)
                    raise dramatiq.Retry("busy", delay=BUSY_RETRY_MILLISECONDS)
                with attempts.holding(conn, tenant_id, request_id, row, first=False) as work:
                    if row is None:
                        log.warning("sender: a retry of an unknown request; ignored")
                    elif row.owner_message_id != owner:
                        log.debug("sender: request %s has a newer message; this ends", request_id)
                    elif row.state in ("sent", "failed"):
                        attempts.outcomes.publish_final_again(work)
                    elif row.state == "sending" and row.data_started_at is not None:
                        attempts.outcomes.close_uncertain(
                            work, "the sender stopped before recording its answer"
                        )
                    elif row.command is None:  # only a row changed by hand
                        attempts.outcomes.fail(
                            work,
                            None,
                            "the command was not kept for its retry",
                            category="internal_error",
                        )
                    else:
                        work.raw = row.command
                        work.row = repo.claim(conn, tenant_id, request_id)
                        attempts.run(work, SendCommand.model_validate(row.command))
            except dramatiq.Retry:
                raise
            except BaseException:
                release_locks(conn)
                raise

    def _struck(self, message: dramatiq.Message[Any], exc: Exception) -> bool:
        """One more unexpected failure, counted in the message; whether it ended the request
        (closed for good, or owned by a newer message)."""
        tenant_id, request_id = message.args
        carried = message.options.get(STRIKES_OPTION)
        strike = self.strikes.strike(
            (tenant_id, request_id),
            (int(carried[0]), float(carried[1])) if carried else (0, time.time()),
        )
        message.options[STRIKES_OPTION] = [strike.count, strike.first_at]
        if not strike.poisoned:
            return False
        reason = POISON_REASON.format(strikes=strike.count, error=f"{type(exc).__name__}: {exc}")
        try:
            return self._close(tenant_id, request_id, reason, message.message_id)
        except Exception:
            log.exception("sender: request %s could not be closed now; retried", request_id)
            return False

    def _close(self, tenant_id: str, request_id: str, reason: str, owner: str) -> bool:
        attempts = self._attempts
        assert attempts is not None
        with self._db.connection() as conn:
            try:
                locked, row = repo.lock_and_get(conn, tenant_id, request_id)
                if not locked:
                    return False
                with attempts.holding(conn, tenant_id, request_id, row, first=False) as work:
                    if row is None or row.owner_message_id != owner:
                        return True  # gone, or a newer message owns it: this copy ends
                    if row.state in ("sent", "failed"):
                        attempts.outcomes.publish_final_again(work)
                    elif row.state == "sending" and row.data_started_at is not None:
                        attempts.outcomes.close_uncertain(work, reason)
                    else:
                        attempts.outcomes.fail(work, None, reason, category="internal_error")
            except BaseException:
                release_locks(conn)
                raise
        return True

    # --- the sweep -------------------------------------------------------------------------

    def sweep_due(self) -> None:
        """Once a minute (the sender's tick)."""
        now = time.monotonic()
        if now - self._swept_at < SWEEP_SECONDS:
            return
        self._swept_at = now
        self.sweep()

    def sweep(self, overdue_seconds: float | None = None) -> int:
        """Requests whose retry is long overdue get a new message, and requests stuck after
        their deadline are closed; how many were taken over or closed."""
        grace = self._grace if overdue_seconds is None else overdue_seconds
        with self._db.connection() as conn:
            due = repo.overdue_retries(conn, grace)
            stuck = repo.stuck_after_deadline(conn)
        return sum(self._take_over(*key) for key in due) + sum(
            self._close_stuck(*key) for key in stuck
        )

    def _take_over(self, tenant_id: str, request_id: str) -> int:
        attempts = self._attempts
        assert attempts is not None
        with self._db.connection() as conn:
            try:
                locked, row = repo.lock_and_get(conn, tenant_id, request_id)
                if not locked:
                    return 0  # at work right now
                with attempts.holding(conn, tenant_id, request_id, row, first=False) as work:
                    if row is None or row.state in ("sent", "failed"):
                        repo.retry_done(conn, tenant_id, request_id)
                        return 0
                    if row.state != "retry_wait":
                        # An attempt cut short: its message comes again. Looked at later.
                        repo.retry_due(conn, tenant_id, request_id, self._grace)
                        return 0
                    attempts.outcomes.reschedule(work)
            except BaseException:
                release_locks(conn)
                raise
        log.warning(
            "sender: request %s waited for a retry that did not come; scheduled again", request_id
        )
        return 1

    def _close_stuck(self, tenant_id: str, request_id: str) -> int:
        attempts = self._attempts
        assert attempts is not None
        with self._db.connection() as conn:
            try:
                locked, row = repo.lock_and_get(conn, tenant_id, request_id)
                if not locked or row is None or row.state != "sending":
                    return 0
                with attempts.holding(conn, tenant_id, request_id, row, first=False) as work:
                    if row.data_started_at is not None:
                        attempts.outcomes.close_uncertain(
                            work, "the sender stopped before recording its answer"
                        )
                    else:
                        attempts.outcomes.fail(
                            work,
                            None,
                            "its command was lost before its first attempt ended (not kept by "
                            "the broker); it was never handed to a mail server",
                            category="internal_error",
                        )
            except BaseException:
                release_locks(conn)
                raise
        return 1
