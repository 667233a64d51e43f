"""A command's first attempt, made in its server's lane (``services.sender.lanes``).

The request is recorded and locked in one statement (``send_requests.start``), then attempted
(``services.sender.attempt``). A command that comes again finds its row:

- final: its result is published again (results are at least once);
- ``sending`` with the mark: the sender died while the server decided; closed as uncertain;
- ``retry_wait``: a redelivered command gives it a new retry message (its retry may never have
  been enqueued); a client's copy is told that it waits;
- ``sending`` without the mark: nothing was handed over; attempted now;
- locked by another thread: requeued after a pause, and answered once that thread is done.

A failure of PostgreSQL or RabbitMQ requeues the command (after a pause); an unexpected one
counts against it (``services.sender.strikes``): at its third strike it is closed as failed and
dead-lettered, and the commands after it go on at once.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from psycopg_pool import ConnectionPool

from services.sender.attempt import Attempts
from services.sender.strikes import Strikes, blameable
from services.sender.work import Work, release_locks
from shared.contracts.send import SendCommand, SendResult
from shared.db import send_requests as repo
from shared.db.pool import DictConnection

log = logging.getLogger(__name__)

REQUEUE_PAUSE_SECONDS = 0.5
POISON_REASON = (
    "the sender failed on this command {strikes} times ({error}); it is not tried again and is"
    " kept in the dead-letter queue"
)
PARKED_REASON = "queued behind other mail to the same server"


@dataclass(frozen=True)
class Job:
    """A validated command in its server's lane."""

    message: Any  # the AMQP message (kombu), acked once the attempt is over
    command: SendCommand
    raw: dict[str, Any]
    redelivered: bool  # AMQP's flag: ours, back after a crash or a requeue


# Told when a job is over: whether to ack its command (else requeue it), and the results to
# publish before the ack.
Done = Callable[[Job, bool, list[SendResult]], None]


class FirstAttempts:
    def __init__(
        self,
        db: ConnectionPool[DictConnection],
        attempts: Attempts,
        strikes: Strikes,
        deadline_seconds: float,
        done: Done,
    ) -> None:
        self._db = db
        self._attempts = attempts
        self._strikes = strikes
        self._deadline = deadline_seconds
        self._done = done

    def deliver(self, job: Job) -> None:
        self._handle(job, park=False)

    def park(self, job: Job) -> None:
        """Its lane is full: recorded as waiting for a retry, without an attempt."""
        self._handle(job, park=True)

    def _handle(self, job: Job, *, park: bool) -> None:
        with self._db.connection() as conn:
            try:
                ack, results = self._attempt(conn, job, park)
            except Exception as exc:  # noqa: BLE001 - requeued, or struck out (_after_failure)
                release_locks(conn)
                ack, results = self._after_failure(job, exc)
        if not ack:
            time.sleep(REQUEUE_PAUSE_SECONDS)  # what failed now will hardly work at once
        self._done(job, ack, results)

    def _attempt(self, conn: DictConnection, job: Job, park: bool) -> tuple[bool, list[SendResult]]:
        tenant_id, request_id = job.command.tenant_id, job.command.request_id
        started = repo.start(conn, tenant_id, request_id, self._deadline)
        if not started.locked:
            return False, []  # at work elsewhere: answered once that is over
        with self._attempts.holding(
            conn, tenant_id, request_id, started.row, first=True, raw=job.raw
        ) as work:
            if started.row is None:
                work.row = repo.get_locked(conn, tenant_id, request_id)
                self._seen_before(work, job, park)
            else:
                self._go(work, job, park)
        return True, work.results

    def _go(self, work: Work, job: Job, park: bool) -> None:
        if park:
            self._attempts.outcomes.park(work, PARKED_REASON)
            return
        self._attempts.run(work, job.command)
        if work.reached_server:
            self._strikes.cleared((work.tenant_id, work.request_id))

    def _seen_before(self, work: Work, job: Job, park: bool) -> None:
        row = work.row
        if row is None:  # removed meanwhile (only an operator does that)
            log.warning("sender: request %s vanished while it was read", work.request_id)
        elif row.state in ("sent", "failed"):
            self._attempts.outcomes.publish_final_again(work)
        elif row.state == "sending" and row.data_started_at is not None:
            self._attempts.outcomes.close_uncertain(
                work, "the sender stopped before recording its answer"
            )
        elif row.state == "retry_wait":
            if job.redelivered:
                self._attempts.outcomes.reschedule(work)  # its retry may never have been enqueued
            else:
                self._attempts.outcomes.publish_waiting(work)
        else:  # nothing was handed over: attempt it now
            work.row = repo.claim(work.conn, row.tenant_id, row.request_id, repo.INTAKE_OWNER)
            self._go(work, job, park)

    # --- an attempt that failed unexpectedly -----------------------------------------------

    def _after_failure(self, job: Job, exc: Exception) -> tuple[bool, list[SendResult]]:
        """Requeue it, or close it once it struck out (module doc)."""
        command = job.command
        log.exception("sender: request %s could not be handled now", command.request_id)
        if not blameable(exc):
            return False, []
        strike = self._strikes.strike((command.tenant_id, command.request_id))
        if not strike.poisoned:
            return False, []
        reason = POISON_REASON.format(strikes=strike.count, error=f"{type(exc).__name__}: {exc}")
        try:
            results = self._close_for_good(job, reason)
        except Exception:
            log.exception("sender: request %s could not be closed now", command.request_id)
            return False, []
        return results is not None, results or []

    def _close_for_good(self, job: Job, reason: str) -> list[SendResult] | None:
        """Failed for good (uncertain if its mail may have been handed over), or its final
        result again; None if another thread holds it."""
        tenant_id, request_id = job.command.tenant_id, job.command.request_id
        with self._db.connection() as conn:
            try:
                locked, row = repo.lock_and_get(conn, tenant_id, request_id)
                if not locked:
                    return None
                with self._attempts.holding(
                    conn, tenant_id, request_id, row, first=True, raw=job.raw
                ) as work:
                    if row is None:  # never recorded: the command in hand is what is kept
                        work.results.append(self._unrecorded(job, reason))
                    elif row.state in ("sent", "failed"):
                        self._attempts.outcomes.publish_final_again(work)
                    elif row.state == "sending" and row.data_started_at is not None:
                        self._attempts.outcomes.close_uncertain(work, reason)
                    else:
                        self._attempts.outcomes.fail(work, None, reason, category="internal_error")
            except BaseException:
                release_locks(conn)
                raise
        return work.results

    def _unrecorded(self, job: Job, reason: str) -> SendResult:
        command = job.command
        self._attempts.outcomes.publisher.dead_letter(
            json.dumps(job.raw).encode(),
            reason=reason,
            request_id=command.request_id,
            tenant_id=command.tenant_id,
        )
        log.warning("sender: request %s failed: %s", command.request_id, reason)
        return SendResult(
            request_id=command.request_id,
            tenant_id=command.tenant_id,
            status="failed",
            final=True,
            reason=reason,
            category="internal_error",
        )
