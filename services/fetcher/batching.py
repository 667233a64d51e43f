"""Splits a mailbox's new mail into batches: bounded in count and in bytes."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from shared.settings import Settings

T = TypeVar("T")


def in_batches(items: list[T], size_of: Callable[[T], int], settings: Settings) -> list[list[T]]:
    """Batches of at most ``fetch_batch_mails`` mails and ``fetch_batch_bytes`` bytes (a larger
    mail makes a batch of its own). A quarantined mail weighs nothing: only its header goes."""
    batches: list[list[T]] = []
    current: list[T] = []
    weight = 0
    for item in items:
        size = size_of(item)
        size = 0 if size > settings.max_mail_bytes else size
        if current and (
            len(current) >= settings.fetch_batch_mails or weight + size > settings.fetch_batch_bytes
        ):
            batches.append(current)
            current, weight = [], 0
        current.append(item)
        weight += size
    if current:
        batches.append(current)
    return batches
