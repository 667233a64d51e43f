"""The status service's metrics.

Label sets are bounded: ``mailroom_email_server_state`` has one series per (server, state) —
six per configured server, removed when the server is deleted; every other label is an enum
(server type, state, ok). Counts of mails live in the fetcher's and sender's own metrics.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Enum

from services.status.state import Change, ServerStatus, State

STATES = [state.value for state in State]

SERVER_STATE = Enum(
    "mailroom_email_server_state",
    "Current state of each mail server (one series per server and state).",
    ["server_id", "type"],
    states=STATES,
)
REPORTS = Counter(
    "mailroom_status_reports_total", "Status reports consumed, by server type.", ["type", "ok"]
)
STATE_CHANGES = Counter(
    "mailroom_status_state_changes_total", "State changes made, by new state.", ["state"]
)

_known: dict[str, str] = {}  # server id -> type label, to remove the series of deleted ones


def changed(change: Change, server_type: str | None) -> None:
    STATE_CHANGES.labels(change.state.value).inc()
    if server_type is not None:
        _known[change.server_id] = server_type
        SERVER_STATE.labels(change.server_id, server_type).state(change.state.value)


def refresh(statuses: Iterable[ServerStatus]) -> None:
    for status in statuses:
        _known[status.server_id] = status.type.value
        SERVER_STATE.labels(status.server_id, status.type.value).state(status.state.value)


def forget(server_id: str) -> None:
    server_type = _known.pop(server_id, None)
    if server_type is not None:
        SERVER_STATE.remove(server_id, server_type)
