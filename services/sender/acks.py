"""Acks of send commands, made in the consumer's thread, many at a time.

A channel belongs to the thread that consumes from it, so the threads that finish a command
only note it (:meth:`Acks.done`, any thread); the consumer's thread acks or requeues it in
:meth:`Acks.settle`, which it calls on every turn of its loop. When every command up to one
delivery tag is done, one ``basic.ack`` with ``multiple`` covers them all. A command done behind
one still in work waits for it, but at most ``HELD_LIMIT`` do: beyond that they are acked one
by one, so a slow command never holds the prefetch window shut. Such an ack also covers every
other message of the channel up to its tag; the config events that share the channel are acked
in their own callbacks in this same thread, before any settle, so it never covers one in hand.
"""

from __future__ import annotations

import logging
from collections import deque

from kombu import Message

log = logging.getLogger(__name__)

HELD_LIMIT = 50


class Acks:
    def __init__(self) -> None:
        self._done: deque[tuple[Message, bool]] = deque()  # appended by any thread
        # The consumer's thread only: commands in delivery order, and those of them that are
        # done and acked (by id) but wait for the ones before them.
        self._in_order: deque[Message] = deque()
        self._tracked: set[int] = set()
        self._held: dict[int, Message] = {}
        self.pending = 0  # received and not settled yet

    def received(self, message: Message) -> None:
        """Consumer's thread: a command handed to the threads."""
        self.pending += 1
        self._in_order.append(message)
        self._tracked.add(id(message))

    def done(self, message: Message, ack: bool) -> None:
        """Any thread: ``ack`` it, or else requeue it (it comes again, ``redelivered``)."""
        self._done.append((message, ack))

    def settle(self) -> None:
        """Consumer's thread: ack (or requeue) the commands that are done."""
        if not self._done:
            return
        while self._done:
            message, ack = self._done.popleft()
            self.pending -= 1
            if ack and id(message) in self._tracked:
                self._held[id(message)] = message
                continue
            _settle_one(message, ack)  # a requeue at once; an ack from before a let_go alone
            self._forget(message)
        self._ack_prefix()
        if len(self._held) > HELD_LIMIT:
            for message in list(self._held.values()):
                _settle_one(message, True)
                self._forget(message)

    def let_go(self) -> None:
        """Consumer's thread: the channel is going; what is done is acked while it may still
        be there, the rest is forgotten (the broker delivers it again)."""
        self._ack_prefix()
        for message in list(self._held.values()):
            _settle_one(message, True)
        self._held.clear()
        self._tracked.clear()
        self._in_order.clear()

    def _forget(self, message: Message) -> None:
        self._held.pop(id(message), None)
        if id(message) in self._tracked:
            self._tracked.discard(id(message))
            self._in_order.remove(message)

    def _ack_prefix(self) -> None:
        last: Message | None = None
        while self._in_order and id(self._in_order[0]) in self._held:
            last = self._in_order.popleft()
            del self._held[id(last)]
            self._tracked.discard(id(last))
        if last is None:
            return
        try:
            last.channel.basic_ack(last.delivery_tag, multiple=True)
        except Exception as exc:  # noqa: BLE001 - its channel is gone: the broker redelivers
            log.info("sender: commands not acked (%s); the broker delivers them again", exc)


def _settle_one(message: Message, ack: bool) -> None:
    try:
        if ack:
            message.ack()
        else:
            message.requeue()
    except Exception as exc:  # noqa: BLE001 - its channel is gone: the broker redelivers
        log.info("sender: command not settled (%s); the broker delivers it again", exc)
