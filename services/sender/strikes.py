"""The poison counter: when an unexpected failure is held against one command.

An attempt that fails unexpectedly (a bug, a setting, something in the command) comes again:
its command is requeued, or its retry retried. So that one bad command cannot come back for
ever, a request that failed so ``POISON_STRIKES`` times in a row, over at least
``POISON_MIN_SECONDS``, is closed as failed and dead-lettered. Unless it is not the only one:
when another request failed so within the window, the fault is likely the sender's, and
failing every mail for good would turn a fixable outage into lost mail; then none is closed,
and one ERROR line a minute says so. What says that a service is away (PostgreSQL, RabbitMQ,
the network) is never held against a command (:func:`blameable`).

One counter for first attempts and retries. A retry's strikes travel in its dramatiq message
(its attempts may be hours apart and made by any process): the caller passes them in as
``carried`` and keeps what comes back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import amqp.exceptions
import dramatiq.errors
import kombu.exceptions
import psycopg

log = logging.getLogger(__name__)

POISON_STRIKES = 3
POISON_MIN_SECONDS = 10.0
WIDESPREAD_SECONDS = 60.0

# Errors that say a service is away, not that a command is bad.
INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    OSError,
    amqp.exceptions.AMQPError,
    amqp.exceptions.MessageNacked,
    kombu.exceptions.KombuError,
    dramatiq.errors.BrokerConnectionError,
)


def blameable(exc: BaseException) -> bool:
    """Whether an unexpected error may be the command's doing. PostgreSQL's "program limit"
    errors (class 54) are ``OperationalError``s too, but they come from the data."""
    return isinstance(exc, psycopg.errors.ProgramLimitExceeded) or not isinstance(
        exc, INFRASTRUCTURE_ERRORS
    )


@dataclass(frozen=True)
class Strike:
    count: int  # strikes in a row, this one included (0: not counted, the fault is widespread)
    first_at: float  # wall-clock time of the first of them
    poisoned: bool  # close the request now


class Strikes:
    """Thread-safe; ``window`` is how long a strike counts as recent (a retry's window is
    twice the longest backoff: the same fault may meet its retries that far apart)."""

    def __init__(self, window: float = WIDESPREAD_SECONDS) -> None:
        self._window = max(window, WIDESPREAD_SECONDS)
        self._lock = threading.Lock()
        # Per request: strikes, the first one's time, the last one's; least recent first.
        self._recent: OrderedDict[tuple[str, str], tuple[int, float, float]] = OrderedDict()
        self._widespread_told_at = -self._window

    def strike(self, key: tuple[str, str], carried: tuple[int, float] | None = None) -> Strike:
        now = time.time()  # wall clock: a retry's strikes may have been counted on another host
        with self._lock:
            recent = self._recent
            counted = recent.pop(key, None)
            while recent and now - next(iter(recent.values()))[2] > self._window:
                recent.popitem(last=False)
            if carried is not None:
                strikes, first = carried
            elif counted is not None and now - counted[2] <= self._window:
                strikes, first = counted[0], counted[1]
            else:
                strikes, first = 0, now
            newest_other = next(reversed(recent.values()), None)
            widespread = newest_other is not None and now - newest_other[2] <= self._window
            tell = widespread and now - self._widespread_told_at > WIDESPREAD_SECONDS
            if tell:
                self._widespread_told_at = now
                struck = 1 + sum(1 for *_, last in recent.values() if now - last <= self._window)
            strikes, first = (0, now) if widespread else (strikes + 1, first)
            recent[key] = (strikes, first, now)
        if tell:
            log.error(
                "sender: unexpected failures on %d commands within %.0f s: none is closed,"
                " they wait for the fault to be fixed",
                struck,
                self._window,
            )
        poisoned = strikes >= POISON_STRIKES and now - first >= POISON_MIN_SECONDS
        return Strike(strikes, first, poisoned)

    def forget_all(self) -> None:
        """As a new process would start: no strikes known."""
        with self._lock:
            self._recent.clear()

    def cleared(self, key: tuple[str, str]) -> None:
        """An attempt got as far as the server's answer: its strikes are no longer in a row."""
        with self._lock:
            self._recent.pop(key, None)
