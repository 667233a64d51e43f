"""Slots for work that holds a scarce resource, bounded per tenant and in total.

A connection test holds a thread and a socket for up to its timeout; a live status stream holds
a task and a queue for as long as the browser keeps it open. Without a bound per tenant, one
tenant's admin (or a script with their token) could take every slot and leave the other
tenants' saves and status pages waiting. So a tenant holds at most ``per_tenant`` slots and all
tenants together at most ``total``; whoever finds no slot is told at once (HTTP 429 with
``Retry-After``), instead of waiting in a request thread that another tenant would need.

A caller that must not be turned away (the OAuth2 callback, whose consent is already used up)
may wait a bounded time for a slot.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager


class NoSlot(Exception):
    """Every slot the tenant may hold, or every slot there is, is taken."""

    def __init__(self, what: str, limit: int, *, per_tenant: bool) -> None:
        super().__init__(what, limit, per_tenant)
        self.what = what  # "connection tests", "live status streams"
        self.limit = limit
        self.per_tenant = per_tenant  # True: the tenant's own limit; False: the installation's

    @property
    def reason(self) -> str:
        if self.per_tenant:
            return (
                f"your company already has {self.limit} {self.what} running, the most it may "
                "have at once; try again when one has finished"
            )
        return (
            f"this installation already has {self.limit} {self.what} running, the most it "
            "allows at once; try again shortly"
        )

    def __str__(self) -> str:
        return self.reason


class TenantSlots:
    """Non-blocking counting slots with a limit per tenant and a limit in total."""

    def __init__(self, what: str, *, total: int, per_tenant: int) -> None:
        if total < 1 or per_tenant < 1:
            raise ValueError("slot limits must be at least 1")
        self.what = what
        self.total = total
        self.per_tenant = min(per_tenant, total)
        self._held: Counter[str] = Counter()
        self._changed = threading.Condition()

    def take(self, tenant_id: str, wait_seconds: float = 0.0) -> Slot:
        """A slot for ``tenant_id``; :class:`NoSlot` when none is free within ``wait_seconds``."""
        deadline = time.monotonic() + wait_seconds
        with self._changed:
            while (refusal := self._refusal(tenant_id)) is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise refusal
                self._changed.wait(left)
            self._held[tenant_id] += 1
        return Slot(self, tenant_id)

    @contextmanager
    def holding(self, tenant_id: str, wait_seconds: float = 0.0) -> Iterator[None]:
        slot = self.take(tenant_id, wait_seconds)
        try:
            yield
        finally:
            slot.release()

    def held(self, tenant_id: str | None = None) -> int:
        """Slots held by ``tenant_id``, or by every tenant."""
        with self._changed:
            return self._held[tenant_id] if tenant_id is not None else self._held.total()

    def _refusal(self, tenant_id: str) -> NoSlot | None:
        if self._held[tenant_id] >= self.per_tenant:
            return NoSlot(self.what, self.per_tenant, per_tenant=True)
        if self._held.total() >= self.total:
            return NoSlot(self.what, self.total, per_tenant=False)
        return None

    def _give_back(self, tenant_id: str) -> None:
        with self._changed:
            self._held[tenant_id] -= 1
            if self._held[tenant_id] <= 0:
                del self._held[tenant_id]
            self._changed.notify_all()


class Slot:
    """One taken slot; ``release`` gives it back (once, however often it is called)."""

    def __init__(self, slots: TenantSlots, tenant_id: str) -> None:
        self._slots = slots
        self.tenant_id = tenant_id
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._slots._give_back(self.tenant_id)
