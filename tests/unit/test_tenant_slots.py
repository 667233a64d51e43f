"""Slots bounded per tenant and in total: a refusal says whose limit it is."""

from __future__ import annotations

import threading

import pytest

from shared.tenant_slots import NoSlot, TenantSlots


def test_a_tenant_at_its_limit_leaves_the_others_their_slots() -> None:
    slots = TenantSlots("connection tests", total=3, per_tenant=2)
    held = [slots.take("a"), slots.take("a")]
    with pytest.raises(NoSlot) as own:
        slots.take("a")
    assert own.value.per_tenant and "your company already has 2 connection tests" in str(own.value)
    held.append(slots.take("b"))
    with pytest.raises(NoSlot) as everyone:
        slots.take("c")
    assert not everyone.value.per_tenant and "installation already has 3" in str(everyone.value)
    held[0].release()
    held[0].release()  # once only
    assert slots.held("a") == 1 and slots.held() == 2
    slots.take("c")


def test_a_caller_may_wait_a_bounded_time_for_a_slot() -> None:
    slots = TenantSlots("connection tests", total=1, per_tenant=1)
    slot = slots.take("a")
    threading.Timer(0.1, slot.release).start()
    with slots.holding("a", wait_seconds=5):
        assert slots.held("a") == 1
    assert slots.held() == 0
    taken = slots.take("b")
    with pytest.raises(NoSlot):
        slots.take("a", wait_seconds=0.05)
    taken.release()
