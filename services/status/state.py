"""How a server's state follows from its settings, the workers' reports and the clock.

Pure functions on :class:`ServerStatus`; the store (``store.py``) runs them atomically in Redis.

- ``disabled``: the server is not enabled.
- ``connecting``: enabled (or its connection settings changed) and no report on these
  settings yet.
- ``ok``: the last report was a success.
- ``failing``: ``failures_before_failing`` reports in a row failed (one failure alone does not
  flap the state; the reason is kept in ``last_error`` meanwhile).
- ``reauth_required``: the worker says the login needs the admin (OAuth2 consent).
- ``stale``: an enabled inbound server had no report for ``stale_factor`` report intervals,
  plus, while it fails, the fetcher's longest backoff. SMTP servers are never stale: the sender
  reports when it sends, and a quiet SMTP server is not a broken one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from shared.contracts.status_reports import FailureCategory, StatusReport
from shared.email_servers import CONNECTION_SETTINGS, EmailServer, ServerType
from shared.settings import Settings


class State(StrEnum):
    OK = "ok"
    FAILING = "failing"
    CONNECTING = "connecting"
    DISABLED = "disabled"
    REAUTH_REQUIRED = "reauth_required"
    STALE = "stale"


ALERTING = frozenset({State.FAILING, State.REAUTH_REQUIRED, State.STALE})


def fingerprint(server: EmailServer) -> str:
    """Changes when a connection setting or the password changes."""
    names = (*CONNECTION_SETTINGS, "password_encrypted")
    values = [repr(getattr(server, name)) for name in names]
    return hashlib.sha256("\x00".join(values).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ServerStatus:
    server_id: str
    tenant_id: str
    name: str
    type: ServerType
    enabled: bool
    version: int
    fingerprint: str
    state: State
    since: datetime
    watch_from: datetime  # the stale clock runs from here (last report, or enabling)
    reason: str | None = None
    category: str | None = None
    last_error: str | None = None
    last_success_at: datetime | None = None
    last_error_at: datetime | None = None
    last_report_at: datetime | None = None
    consecutive_failures: int = 0
    mails_fetched: int = 0
    mails_sent: int = 0
    mails_failed: int = 0
    last_poll_seconds: float | None = None
    worker: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, datetime):
                data[key] = value.isoformat()
        return json.dumps(data)

    @classmethod
    def from_json(cls, raw: bytes | str) -> ServerStatus:
        data = json.loads(raw)
        for key in ("since", "watch_from", "last_success_at", "last_error_at", "last_report_at"):
            if data.get(key) is not None:
                data[key] = datetime.fromisoformat(data[key])
        data["type"] = ServerType(data["type"])
        data["state"] = State(data["state"])
        # Fields of a newer version are left out: its statuses stay readable during an upgrade.
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    def public(self) -> dict[str, Any]:
        """The status API's item (CONTRACT: server_id, name, type, enabled, state, reason, …)."""
        data: dict[str, Any] = json.loads(self.to_json())
        for internal in ("fingerprint", "watch_from", "extra", "version"):
            data.pop(internal)
        data["server_version"] = self.version
        return data


@dataclass(frozen=True)
class Change:
    """A state change: what the stream shows and, for ``ALERTING`` states, what alerts."""

    tenant_id: str
    server_id: str
    state: State
    previous_state: State | None
    reason: str | None
    at: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "server_id": self.server_id,
            "state": self.state.value,
            "previous_state": self.previous_state.value if self.previous_state else None,
            "reason": self.reason,
            "at": self.at.isoformat(),
        }


@dataclass(frozen=True)
class Rules:
    failures_before_failing: int
    stale_factor: float
    intervals: dict[ServerType, float]
    backoff_allowance: float

    @classmethod
    def from_settings(cls, settings: Settings) -> Rules:
        heartbeat = settings.status_heartbeat_seconds
        return cls(
            failures_before_failing=settings.status_failures_before_failing,
            stale_factor=settings.status_stale_factor,
            intervals={
                ServerType.IMAP: min(settings.imap_poll_seconds, heartbeat),
                ServerType.POP3: min(settings.pop3_poll_seconds, heartbeat),
            },
            # A failing mailbox is retried after up to 1.5 times the longest backoff (jitter), and
            # one attempt may wait for the server up to its timeout.
            backoff_allowance=1.5 * settings.fetch_retry_max_seconds
            + settings.mail_server_timeout_seconds,
        )

    def stale_after(self, status: ServerStatus) -> float | None:
        interval = self.intervals.get(status.type)
        if interval is None:
            return None
        allowance = self.backoff_allowance if status.consecutive_failures else 0.0
        return self.stale_factor * interval + allowance


def now() -> datetime:
    return datetime.now(UTC)


def configure(current: ServerStatus | None, server: EmailServer, at: datetime) -> ServerStatus:
    """The status after the server was created or changed."""
    print_ = fingerprint(server)
    if current is None or current.state is State.DISABLED or current.fingerprint != print_:
        if not server.enabled:
            state = State.DISABLED
        elif server.type is ServerType.SMTP and _tested_ok(server):
            state = State.OK  # the sender reports only when it sends; the save's test says ok
        else:
            state = State.CONNECTING
        base = current or _new(server, at)
        fresh = replace(
            base,
            state=state,
            since=at if state is not base.state or current is None else base.since,
            watch_from=at,
            reason=None,
            category=None,
            consecutive_failures=0,
            last_success_at=base.last_success_at
            or (_tested_at(server) if state is State.OK else None),
        )
        return _with_settings(fresh, server, print_)
    if not server.enabled:
        return _with_settings(
            replace(current, state=State.DISABLED, since=at, reason=None, category=None),
            server,
            print_,
        )
    return _with_settings(current, server, print_)


def apply_report(
    current: ServerStatus, report: StatusReport, rules: Rules, at: datetime
) -> ServerStatus | None:
    """The status after a worker's report, or None when the report does not count."""
    if not current.enabled or report.server_version < current.version:
        return None  # a poller of older settings, or of a server switched off meanwhile
    status = replace(
        current,
        last_report_at=at,
        watch_from=at,
        worker=report.worker,
        mails_fetched=current.mails_fetched + report.mails_fetched,
        mails_sent=current.mails_sent + report.mails_sent,
        mails_failed=current.mails_failed + report.mails_failed,
        last_poll_seconds=(
            report.duration_seconds
            if report.duration_seconds is not None
            else current.last_poll_seconds
        ),
    )
    if report.ok:
        return _enter(
            replace(
                status,
                consecutive_failures=0,
                last_success_at=report.at,
                reason=None,
                category=None,
            ),
            State.OK,
            at,
        )
    failures = current.consecutive_failures + 1
    status = replace(
        status,
        consecutive_failures=failures,
        last_error_at=report.at,
        last_error=report.reason,
    )
    category = report.category.value if report.category else None
    failed = replace(status, reason=report.reason, category=category)
    if report.category is FailureCategory.REAUTH_REQUIRED:
        return _enter(failed, State.REAUTH_REQUIRED, at)
    if failures >= rules.failures_before_failing:
        return _enter(failed, State.FAILING, at)
    if current.state is State.STALE:
        return _enter(replace(status, reason=None, category=None), State.CONNECTING, at)
    return status


def check_stale(current: ServerStatus, rules: Rules, at: datetime) -> ServerStatus | None:
    """``stale`` when no report came for too long; None when nothing changes."""
    if not current.enabled or current.state in (
        State.STALE,
        State.DISABLED,
        State.REAUTH_REQUIRED,
    ):
        return None
    limit = rules.stale_after(current)
    if limit is None:
        return None
    silent = (at - current.watch_from).total_seconds()
    if silent <= limit:
        return None
    reason = f"no report from any fetcher for {silent:.0f} s (expected one every " + (
        f"{rules.intervals[current.type]:.0f} s); is a fetcher running?"
    )
    return _enter(replace(current, reason=reason, category=None), State.STALE, at)


def change_between(before: ServerStatus | None, after: ServerStatus) -> Change | None:
    if before is not None and before.state is after.state:
        return None
    return Change(
        tenant_id=after.tenant_id,
        server_id=after.server_id,
        state=after.state,
        previous_state=before.state if before else None,
        reason=after.reason,
        at=after.since,
    )


def _enter(status: ServerStatus, state: State, at: datetime) -> ServerStatus:
    if status.state is state:
        return status
    return replace(status, state=state, since=at)


def _new(server: EmailServer, at: datetime) -> ServerStatus:
    return ServerStatus(
        server_id=server.id,
        tenant_id=server.tenant_id,
        name=server.name,
        type=server.type,
        enabled=server.enabled,
        version=server.version,
        fingerprint="",
        state=State.DISABLED,
        since=at,
        watch_from=at,
    )


def _with_settings(status: ServerStatus, server: EmailServer, print_: str) -> ServerStatus:
    return replace(
        status,
        tenant_id=server.tenant_id,
        name=server.name,
        type=server.type,
        enabled=server.enabled,
        version=server.version,
        fingerprint=print_,
    )


def _tested_ok(server: EmailServer) -> bool:
    return bool(server.last_connection and server.last_connection.get("ok"))


def _tested_at(server: EmailServer) -> datetime | None:
    raw = (server.last_connection or {}).get("checked_at")
    return datetime.fromisoformat(raw) if isinstance(raw, str) else None
