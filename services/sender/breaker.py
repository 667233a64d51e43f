"""Servers that cannot be reached are not tried by every mail: a breaker per server.

A server that accepts connections and never greets, or drops them, costs every attempt the
whole SMTP timeout. Once an attempt fails so (the server unreachable, not a refusal of the
mail), the server's breaker opens: for a cool-off that doubles with each failure in a row (up
to ``max_seconds``), attempts for that server fail at once with the same reason, as temporary
failures that are retried later. The first attempt after the cool-off tries the server again;
a success closes the breaker. So a dead server costs one timeout per cool-off, not one per mail,
and the threads and prefetch it holds are freed at once.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from shared.contracts.status_reports import FailureCategory

# Failures that say the server is unreachable: its next mail would meet the same.
UNREACHABLE = frozenset(
    {
        FailureCategory.DNS,
        FailureCategory.REFUSED,
        FailureCategory.TIMEOUT,
        FailureCategory.NETWORK,
    }
)


@dataclass
class _Open:
    failures: int
    until: float
    reason: str
    category: FailureCategory


class Breakers:
    def __init__(self, base_seconds: float = 5.0, max_seconds: float = 300.0) -> None:
        self._base = base_seconds
        self._max = max_seconds
        self._lock = threading.Lock()
        self._open: dict[str, _Open] = {}

    def blocked(self, server_id: str) -> _Open | None:
        """Why ``server_id`` is not tried now, or None (closed, or its cool-off is over: the
        next attempt goes through and decides)."""
        with self._lock:
            state = self._open.get(server_id)
            if state is None or time.monotonic() >= state.until:
                return None
            return state

    def failed(self, server_id: str, category: FailureCategory, reason: str) -> None:
        if category not in UNREACHABLE:
            return
        with self._lock:
            failures = self._open[server_id].failures + 1 if server_id in self._open else 1
            cool_off = min(self._max, self._base * 2 ** (failures - 1))
            self._open[server_id] = _Open(failures, time.monotonic() + cool_off, reason, category)

    def succeeded(self, server_id: str) -> None:
        with self._lock:
            self._open.pop(server_id, None)
