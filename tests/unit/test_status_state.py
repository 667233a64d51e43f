"""The state rules of the status service, without Redis or a broker."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from services.status.state import (
    Rules,
    State,
    apply_report,
    change_between,
    check_stale,
    configure,
)
from shared.contracts.status_reports import FailureCategory, StatusReport
from shared.email_servers import AuthType, EmailServer, ServerType

T0 = datetime(2025, 1, 1, tzinfo=UTC)
RULES = Rules(
    failures_before_failing=2,
    stale_factor=3,
    intervals={ServerType.IMAP: 60.0, ServerType.POP3: 20.0},
    backoff_allowance=510.0,
)


def server(**changes: object) -> EmailServer:
    base = EmailServer(
        id="s1",
        tenant_id="acme",
        type=ServerType.IMAP,
        name="Support",
        host="imap.example.com",
        tls=True,
        auth_type=AuthType.BASIC,
        enabled=True,
        version=1,
        routing_plan_id="plan",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def report(ok: bool, version: int = 1, **fields: object) -> StatusReport:
    return StatusReport(
        tenant_id="acme",
        server_id="s1",
        server_type=ServerType.IMAP,
        server_version=version,
        worker="fetcher.test.1",
        ok=ok,
        **fields,
    )


def test_enabled_server_starts_connecting_disabled_one_disabled() -> None:
    assert configure(None, server(), T0).state is State.CONNECTING
    assert configure(None, server(enabled=False), T0).state is State.DISABLED


def test_one_failure_does_not_flap_the_second_makes_it_failing() -> None:
    ok = apply_report(configure(None, server(), T0), report(True), RULES, T0)
    assert ok is not None and ok.state is State.OK
    once = apply_report(ok, report(False, reason="connection refused by x:1"), RULES, T0)
    assert once is not None and once.state is State.OK and once.consecutive_failures == 1
    assert once.last_error == "connection refused by x:1" and once.reason is None
    twice = apply_report(once, report(False, reason="connection refused by x:1"), RULES, T0)
    assert twice is not None and twice.state is State.FAILING
    assert twice.reason == "connection refused by x:1"
    change = change_between(once, twice)
    assert change is not None and change.previous_state is State.OK
    back = apply_report(twice, report(True, mails_fetched=3, duration_seconds=0.2), RULES, T0)
    assert back is not None and back.state is State.OK and back.consecutive_failures == 0
    assert back.mails_fetched == 3 and back.last_poll_seconds == 0.2


def test_reauth_required_at_once() -> None:
    status = configure(None, server(), T0)
    result = apply_report(
        status, report(False, category=FailureCategory.REAUTH_REQUIRED, reason="x"), RULES, T0
    )
    assert result is not None and result.state is State.REAUTH_REQUIRED


def test_reports_of_older_settings_do_not_count() -> None:
    status = configure(None, server(version=3), T0)
    assert apply_report(status, report(False, version=2), RULES, T0) is None


def test_silence_turns_stale_after_three_intervals() -> None:
    status = configure(None, server(type=ServerType.POP3), T0)
    assert check_stale(status, RULES, T0 + timedelta(seconds=60)) is None
    stale = check_stale(status, RULES, T0 + timedelta(seconds=61))
    assert stale is not None and stale.state is State.STALE
    assert "no report from any fetcher" in (stale.reason or "")


def test_a_failing_server_gets_the_fetchers_backoff_before_stale() -> None:
    ok = apply_report(configure(None, server(), T0), report(False), RULES, T0)
    assert ok is not None
    assert check_stale(ok, RULES, T0 + timedelta(seconds=600)) is None
    assert check_stale(ok, RULES, T0 + timedelta(seconds=691)) is not None


def test_smtp_is_never_stale_and_starts_from_the_save_test() -> None:
    smtp = server(type=ServerType.SMTP, routing_plan_id=None, last_connection={"ok": True})
    status = configure(None, smtp, T0)
    assert status.state is State.OK
    assert check_stale(status, RULES, T0 + timedelta(days=1)) is None


def test_a_changed_setting_starts_over_a_renamed_server_does_not() -> None:
    ok = apply_report(configure(None, server(), T0), report(True), RULES, T0)
    assert ok is not None
    renamed = configure(ok, server(name="Neu", version=2), T0)
    assert renamed.state is State.OK and renamed.name == "Neu"
    moved = configure(ok, server(port=1993, version=2), T0)
    assert moved.state is State.CONNECTING
    off = configure(ok, server(enabled=False, version=2), T0)
    assert off.state is State.DISABLED
    assert apply_report(off, report(True, version=2), RULES, T0) is None
