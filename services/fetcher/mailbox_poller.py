"""The plumbing every mailbox poller shares: its own thread, a lease, backoff, status reports.

Each mailbox is served by its own thread, so one slow or broken account never stalls another.
A poller holds the mailbox's lease while it works (several fetcher processes may run); after a
failure it reports the reason and waits with exponential backoff and jitter before the next
attempt. Subclasses (``imap_poller``, ``pop3_poller``) hold only the protocol's logic.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass

from psycopg_pool import ConnectionPool

from services.fetcher.handover import Handover
from services.fetcher.publisher import BrokerUnavailable, InboundPublisher
from shared import metrics
from shared.contracts.status_reports import FailureCategory, StatusReport
from shared.db.pool import DictConnection
from shared.email_servers import AuthType, EmailServer
from shared.leases import Leases, LeasesUnavailable
from shared.login_secrets import LoginSecrets
from shared.mail.connector import Connector
from shared.mail.errors import MailServerError
from shared.settings import Settings

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """Another fetcher owns the mailbox now (this one was too slow to renew)."""


@dataclass(frozen=True)
class FetcherContext:
    """What every poller of a fetcher process shares."""

    settings: Settings
    pool: ConnectionPool[DictConnection]
    publisher: InboundPublisher
    login_secrets: LoginSecrets
    leases: Leases
    worker: str
    connector: Connector


class MailboxPoller(threading.Thread):
    def __init__(
        self,
        server: EmailServer,
        context: FetcherContext,
        predecessor: MailboxPoller | None = None,
    ) -> None:
        super().__init__(name=f"{server.type.value}-{server.id[:8]}", daemon=True)
        self.server = server
        self.context = context
        self.handover = Handover(context.pool, context.publisher, server)
        self._predecessor = predecessor
        self._stopping = threading.Event()
        self._lease_renewed = 0.0
        self._last_report = time.monotonic()
        self.mails_fetched = 0

    # --- lifecycle -------------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run(self) -> None:
        if self._predecessor is not None:
            self._predecessor.join()  # never two sessions on one mailbox from this process
            self._predecessor = None
        lease = self.server.id
        failures = 0
        try:
            while not self.stopping:
                try:
                    if not self.context.leases.acquire(lease):
                        self._stopping.wait(1.0)  # another fetcher serves it; take over if it dies
                        continue
                    self._lease_renewed = time.monotonic()
                    self.serve()
                    failures = 0
                except LeaseLost:
                    log.warning("%s: lease lost to another fetcher", self.name)
                    continue
                except MailServerError as error:
                    failures += 1
                    if error.category is FailureCategory.AUTHENTICATION:
                        self.context.login_secrets.login_refused(self.server)
                    self.report_failure(error.category, error.reason)
                except BrokerUnavailable as error:
                    failures += 1
                    self.report_failure(FailureCategory.INTERNAL, f"RabbitMQ unavailable: {error}")
                except LeasesUnavailable as error:
                    failures += 1
                    self.report_failure(FailureCategory.INTERNAL, str(error))
                except Exception as error:
                    failures += 1
                    log.exception("%s: unexpected failure", self.name)
                    self.report_failure(FailureCategory.INTERNAL, f"internal error: {error!r}")
                if failures:
                    self._stopping.wait(self._backoff(failures))
        finally:
            self._release(lease)

    def _release(self, lease: str) -> None:
        """Give the mailbox back at once; if Redis cannot be asked, the lease runs out instead
        and another fetcher takes over after one lease period."""
        try:
            self.context.leases.release(lease)
        except LeasesUnavailable as error:
            log.warning("%s: lease not released (%s); it expires by itself", self.name, error)

    def _backoff(self, failures: int) -> float:
        """1 s, 2 s, 4 s … up to the limit, each with ±50 % jitter so mailboxes spread out."""
        limit = self.context.settings.fetch_retry_max_seconds
        return float(min(limit, 2.0 ** (failures - 1)) * random.uniform(0.5, 1.5))

    # --- for subclasses --------------------------------------------------------------------

    def serve(self) -> None:
        """Connect and work until ``stopping``; raise what went wrong."""
        raise NotImplementedError

    def keep_going(self) -> bool:
        """False once asked to stop; renews the lease when due (call at least every second)."""
        if self.stopping:
            return False
        lease_seconds = self.context.settings.mailbox_lease_seconds
        if time.monotonic() - self._lease_renewed > lease_seconds / 3:
            if not self.context.leases.renew(self.server.id):
                raise LeaseLost
            self._lease_renewed = time.monotonic()
        if time.monotonic() - self._last_report >= self.context.settings.status_heartbeat_seconds:
            self._report(ok=True, connected=True)  # heartbeat: alive, e.g. waiting in IDLE
        return True

    def confirm_lease(self) -> None:
        """Renew the lease now, right before a hand-over: a fetcher that lost its mailbox to
        another (it was too slow) must not publish what the other may publish too."""
        if not self.context.leases.renew(self.server.id):
            raise LeaseLost
        self._lease_renewed = time.monotonic()

    def pause(self, seconds: float) -> None:
        """Wait between polls, renewing the lease, ending early when asked to stop."""
        deadline = time.monotonic() + seconds
        while self.keep_going() and (left := deadline - time.monotonic()) > 0:
            self._stopping.wait(min(1.0, left))

    def check_consent(self) -> None:
        """OAuth2: a session outlives its access token, so the token is checked (and refreshed
        when due) at every poll; a consent the provider ended is found within one poll, not
        at the next reconnect, and the session is given up."""
        if self.server.auth_type is AuthType.OAUTH2:
            self.login_secret()

    def login_secret(self) -> str | None:
        """The password, or for an OAuth2 server a fresh access token: asked for at every
        login, so a refreshed token is used as soon as it exists."""
        return self.context.login_secrets.for_server(self.server)

    def report_ok(self, fetched: int, duration: float) -> None:
        self.mails_fetched += fetched
        metrics.MAILS_FETCHED.labels(self.server.type.value).inc(fetched)
        metrics.POLLS.labels(self.server.type.value, "ok").inc()
        metrics.POLL_SECONDS.labels(self.server.type.value).observe(duration)
        self._report(ok=True, connected=True, mails_fetched=fetched, duration_seconds=duration)

    def report_failure(self, category: FailureCategory, reason: str) -> None:
        log.warning("%s (%s): %s", self.name, self.server.host, reason)
        metrics.POLLS.labels(self.server.type.value, "failed").inc()
        metrics.POLL_FAILURES.labels(self.server.type.value, category.value).inc()
        self._report(ok=False, category=category, reason=reason)

    def _report(self, **fields: object) -> None:
        self._last_report = time.monotonic()
        report = StatusReport(
            tenant_id=self.server.tenant_id,
            server_id=self.server.id,
            server_type=self.server.type,
            server_version=self.server.version,
            worker=self.context.worker,
            **fields,
        )
        self.context.publisher.report(report)
