"""One attempt at a send request, the same for a first attempt and for a retry.

The thread making it holds the request's advisory lock (``shared.db.send_requests``) and the
row is ``sending``. The steps: resolve the route (which server sends, as whom) → build the mail
→ an OAuth2 access token → the server's breaker and rate limit → the "DATA starts" mark →
the SMTP transaction → the outcome recorded: ``sent``, ``failed`` (final, dead-lettered) or
``retry_wait`` (a dramatiq message makes the next attempt). The mark is committed once MAIL
FROM is on its way and before the mail's final ``.``: from then on a crash means "outcome
unknown", and the request is closed as uncertain instead of being sent again (at most once).
What the attempt ends in is recorded and told by ``services.sender.outcomes``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from services.sender.breaker import Breakers
from services.sender.connections import SevenBitOnly, SmtpConnections
from services.sender.mime import BuiltMail, MimeError, build
from services.sender.outcomes import Outcomes
from services.sender.publisher import StatusReporter
from services.sender.rate_limit import RateLimiter
from services.sender.resolver import NoRoute, Resolver, Route, UnreadablePassword
from services.sender.work import Work, release_locks
from shared import metrics
from shared.contracts.send import SendCommand, SendResult
from shared.contracts.status_reports import FailureCategory
from shared.db import send_requests as repo
from shared.db.pool import DictConnection
from shared.email_servers import AuthType
from shared.login_secrets import LoginSecrets
from shared.mail.errors import MailServerError
from shared.mail.smtp import SmtpError

log = logging.getLogger(__name__)


class _Mark:
    """The "DATA starts" mark as the SMTP transaction's handover (``shared.mail.smtp``)."""

    def __init__(self, work: Work, route: Route, mail: BuiltMail) -> None:
        self._work, self._route, self._mail = work, route, mail

    def start(self) -> None:
        work = self._work
        repo.mark_data_started(
            work.conn, work.tenant_id, work.request_id, self._route.server_id, self._mail.message_id
        )


class Attempts:
    def __init__(
        self,
        *,
        db: ConnectionPool[DictConnection],
        resolver: Resolver,
        connections: SmtpConnections,
        limiter: RateLimiter,
        breakers: Breakers,
        login_secrets: LoginSecrets,
        reporter: StatusReporter,
        outcomes: Outcomes,
        rate_limit_wait_seconds: float,
        stopping: threading.Event,
    ) -> None:
        self.db = db
        self.resolver = resolver
        self.connections = connections
        self.limiter = limiter
        self.breakers = breakers
        self.login_secrets = login_secrets
        self.reporter = reporter
        self.outcomes = outcomes
        self._rate_limit_wait = rate_limit_wait_seconds
        self._stopping = stopping

    @contextmanager
    def holding(
        self,
        conn: DictConnection,
        tenant_id: str,
        request_id: str,
        row: repo.SendRequest | None,
        *,
        first: bool,
        raw: dict[str, Any] | None = None,
    ) -> Iterator[Work]:
        """The request's lock is held on entry; released on exit unless a finish did it."""
        work = Work(conn, tenant_id, request_id, row, raw, first)
        try:
            yield work
        finally:
            if work.locked and not conn.closed:
                repo.unlock(conn, tenant_id, request_id)

    # --- the attempt -----------------------------------------------------------------------

    def run(self, work: Work, command: SendCommand) -> None:
        try:
            route = self.resolver.resolve(command)
        except NoRoute as exc:
            self.outcomes.fail(work, None, exc.reason, category="no_route")
            return
        except UnreadablePassword as exc:
            self._login_unavailable(work, Route(exc.server, "", None), exc.error)
            return
        blocked = self.breakers.blocked(route.server.id)
        if blocked is not None:
            reason = f"{blocked.reason} (not tried again yet)"
            self._smtp_failed(work, route, SmtpError(blocked.category, reason, temporary=True))
            return
        if route.server.auth_type is AuthType.OAUTH2:
            try:  # a fresh access token per attempt; pooled connections keep theirs
                route = replace(route, password=self.login_secrets.for_server(route.server))
            except MailServerError as exc:
                self._login_unavailable(work, route, exc)
                return
        if not self.limiter.wait(route.server.id, self._stopping, self._rate_limit_wait):
            limited = SmtpError(
                FailureCategory.INTERNAL,
                f"over the send rate of {route.server.host}: sent later",
                temporary=True,
            )
            self.outcomes.retry_later(work, route, limited, report=False)
            return
        try:
            mail = build(command, route.from_mailbox, allow_smtputf8=True)
            try:
                self._send(work, route, mail)
            except SevenBitOnly:
                self._send(work, route, build(command, route.from_mailbox, eight_bit=False))
        except MimeError as exc:
            self.outcomes.fail(work, route, str(exc), category="invalid_command")

    def _send(self, work: Work, route: Route, mail: BuiltMail) -> None:
        started = time.monotonic()
        try:
            code, text = self.connections.send(
                route.server,
                route.password,
                mail.envelope_from,
                mail.recipients,
                mail.data,
                handover=_Mark(work, route, mail),
                smtputf8=mail.smtputf8,
            )
        except SmtpError as exc:
            self._smtp_failed(work, route, exc)
            return
        metrics.SEND_SECONDS.observe(time.monotonic() - started)
        work.reached_server = True
        self.breakers.succeeded(route.server.id)
        self._record_sent(work, route.server_id, code, text)
        self.reporter.record(route.server, ok=True, sent=True)
        row = work.request
        self.outcomes.emit(
            work,
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
            ),
        )

    def _record_sent(self, work: Work, server_id: str | None, code: int, text: str) -> None:
        """``sent`` with the lock released; an accepted mail whose ``sent`` fails to be
        recorded (a connection that broke) is recorded once more on a fresh connection: else
        it would come again and be closed as uncertain, and its client told "failed" for a mail
        that arrived."""
        fields: dict[str, Any] = {"server_id": server_id, "smtp_code": code, "smtp_response": text}
        try:
            repo.finish(
                work.conn, work.tenant_id, work.request_id, state="sent", unlock=True, **fields
            )
        except psycopg.Error:
            log.warning("sender: request %s was accepted; recording it again", work.request_id)
            release_locks(work.conn)  # its lock must not stay with a pooled session
            self._record_elsewhere(work, fields)
        work.locked = False

    def _record_elsewhere(self, work: Work, fields: dict[str, Any]) -> None:
        # A fresh session: the broken one holds the lock, or lost it with its connection.
        with self.db.connection() as fresh:
            repo.finish(fresh, work.tenant_id, work.request_id, state="sent", **fields)

    # --- failures --------------------------------------------------------------------------

    def _smtp_failed(self, work: Work, route: Route, exc: SmtpError) -> None:
        row = work.request
        if route.server.auth_type is AuthType.OAUTH2 and exc.category is (
            FailureCategory.AUTHENTICATION
        ):
            # A refused token (revoked early?) is not the mail's fault: refresh, try again.
            self.login_secrets.login_refused(route.server)
            exc = SmtpError(
                exc.category, exc.reason, temporary=True, code=exc.code, response=exc.response
            )
        no_reply = exc.code is None or exc.code < 0
        work.reached_server = not no_reply
        if no_reply:
            self.breakers.failed(route.server.id, exc.category, exc.reason)
        server_fault = no_reply or exc.category is not FailureCategory.PROTOCOL
        self.reporter.record(
            route.server, ok=not server_fault, sent=False, reason=exc.reason, category=exc.category
        )
        if exc.handed_over and no_reply:
            self.outcomes.close_uncertain(work, exc.reason, route=route)
            return
        if exc.temporary and datetime.now(UTC) < row.deadline_at:
            self.outcomes.retry_later(work, route, exc)
            return
        reason = f"{exc.reason} (retried until the deadline)" if exc.temporary else exc.reason
        self.outcomes.fail(work, route, reason, error=exc)

    def _login_unavailable(self, work: Work, route: Route, error: MailServerError) -> None:
        """No secret to log in with (consent missing, the provider away, a password no key
        opens): retried until the deadline, so mail waits for the admin instead of failing at
        once, and the server is reported failing."""
        self._smtp_failed(work, route, SmtpError(error.category, error.reason, temporary=True))
