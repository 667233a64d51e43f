"""What an attempt ends in, recorded and told: ``sent`` results, ``failed`` (final, the
command dead-lettered), ``retry_wait`` (a dramatiq message makes the next attempt), uncertain,
and the answers to a command that comes again.

A first attempt's results go out with its command's ack (``Work.results``); a retry's are
published at once.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Protocol

import dramatiq

from services.sender.publisher import Publisher
from services.sender.resolver import Route
from services.sender.work import Work
from shared.contracts.send import SendResult
from shared.db import send_requests as repo
from shared.mail.smtp import SmtpError

log = logging.getLogger(__name__)

UNCERTAIN_REASON = (
    "delivery outcome unknown: the mail was handed to the SMTP server ({detail}) but its answer "
    "was not recorded; it is not sent again, so it arrived once or not at all"
)


class Scheduler(Protocol):
    """Where the next attempt of a request comes from (``services.sender.retries``)."""

    max_backoff_seconds: float

    def new_owner(self, tenant_id: str, request_id: str) -> dramatiq.Message[Any]: ...

    def enqueue(self, message: dramatiq.Message[Any], delay_ms: int) -> None: ...

    def first_backoff_ms(self) -> int: ...


class Outcomes:
    def __init__(self, publisher: Publisher, scheduler: Scheduler) -> None:
        self.publisher = publisher
        self.scheduler = scheduler

    def retry_later(self, work: Work, route: Route, exc: SmtpError, report: bool = True) -> None:
        """``retry_wait``, a result that says so (unless ``report`` is off), and the next
        attempt to dramatiq: a new message for a first attempt, the same one again for a
        retry (dramatiq's backoff)."""
        row = work.request
        fields: dict[str, Any] = {
            "server_id": route.server_id,
            "smtp_code": exc.code,
            "smtp_response": exc.response,
            "reason": exc.reason,
        }
        log.info("sender: request %s: %s; will retry", row.request_id, exc.reason)
        if not work.first:
            due = self.scheduler.max_backoff_seconds
            repo.retry_due(work.conn, work.tenant_id, work.request_id, due)
            self.finish(work, "retry_wait", **fields)
            if report:
                self.emit(work, self._result(row, route, exc.reason, exc, final=False))
            raise dramatiq.Retry(exc.reason)  # dramatiq enqueues this message again, later
        message = self.scheduler.new_owner(work.tenant_id, work.request_id)
        delay = self.scheduler.first_backoff_ms()
        repo.retry_due(work.conn, work.tenant_id, work.request_id, delay / 1000)
        self.finish(
            work, "retry_wait", owner_message_id=message.message_id, command=work.raw, **fields
        )
        if report:
            result = self._result(row, route, exc.reason, exc, final=False, next_in=delay / 1000)
            self.emit(work, result)
        self.scheduler.enqueue(message, delay)

    def park(self, work: Work, reason: str) -> None:
        """A new request waits for a retry without an attempt (its server's lane is full)."""
        message = self.scheduler.new_owner(work.tenant_id, work.request_id)
        delay = self.scheduler.first_backoff_ms()
        repo.retry_due(work.conn, work.tenant_id, work.request_id, delay / 1000)
        self.finish(
            work, "retry_wait", owner_message_id=message.message_id, command=work.raw, reason=reason
        )
        self.scheduler.enqueue(message, delay)

    def reschedule(self, work: Work) -> None:
        """A ``retry_wait`` request gets a new message as its owner (an older one, if any
        comes, ends on the owner check) and is due again."""
        message = self.scheduler.new_owner(work.tenant_id, work.request_id)
        delay = self.scheduler.first_backoff_ms()
        repo.take_over(work.conn, work.tenant_id, work.request_id, message.message_id)
        repo.retry_due(work.conn, work.tenant_id, work.request_id, delay / 1000)
        self.scheduler.enqueue(message, delay)

    def fail(
        self,
        work: Work,
        route: Route | None,
        reason: str,
        *,
        error: SmtpError | None = None,
        category: str | None = None,
        uncertain: bool = False,
    ) -> None:
        """``failed`` for good: recorded, the command dead-lettered, a final result."""
        row = work.request
        self.finish(
            work,
            "failed",
            server_id=route.server_id if route else None,
            smtp_code=error.code if error else None,
            smtp_response=error.response if error else None,
            reason=reason,
            uncertain=uncertain,
        )
        command = work.raw or row.command
        if command is not None:  # else never kept (a first attempt's command was lost)
            self.publisher.dead_letter(
                json.dumps(command).encode(),
                reason=reason,
                request_id=row.request_id,
                tenant_id=row.tenant_id,
                smtp_code=error.code if error else None,
                smtp_response=error.response if error else None,
                attempts=row.attempts,
            )
        self.emit(
            work,
            self._result(
                row, route, reason, error, final=True, uncertain=uncertain, category=category
            ),
        )
        log.warning("sender: request %s failed: %s", row.request_id, reason)

    def close_uncertain(self, work: Work, detail: str, route: Route | None = None) -> None:
        self.fail(
            work,
            route,
            UNCERTAIN_REASON.format(detail=detail),
            category="uncertain",
            uncertain=True,
        )

    # --- results ---------------------------------------------------------------------------

    def emit(self, work: Work, result: SendResult) -> None:
        """A first attempt's result goes out with its command's ack; a retry's at once."""
        if work.first:
            work.results.append(result)
        else:
            self.publisher.result(result)

    def publish_final_again(self, work: Work) -> None:
        row = work.request
        self.emit(
            work,
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
            ),
        )

    def publish_waiting(self, work: Work) -> None:
        """A copy of a request that waits for a retry is told so (not silence)."""
        row = work.request
        self.emit(
            work, self._result(row, None, row.reason or "waiting for a retry", None, final=False)
        )

    def finish(self, work: Work, state: str, **fields: Any) -> None:
        repo.finish(
            work.conn, work.tenant_id, work.request_id, state=state, unlock=work.locked, **fields
        )
        work.locked = False

    @staticmethod
    def _result(
        row: repo.SendRequest,
        route: Route | None,
        reason: str,
        exc: SmtpError | None,
        *,
        final: bool,
        uncertain: bool = False,
        category: str | None = None,
        next_in: float | None = None,
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
            next_attempt_in_seconds=next_in,
        )
