"""The sender's intake: first attempts in delivery threads, acks in the consumer's thread.

The kombu consumer (:mod:`services.sender.supervisor`) reads up to ``COMMAND_PREFETCH``
commands ahead and :meth:`Intake.submit` queues each validated one for
``MAILROOM_SENDER_THREADS`` delivery threads. A thread takes what is waiting, up to
``BATCH_LIMIT`` commands of distinct requests, and makes their first attempts in order
(:meth:`Sender.deliver_batch <services.sender.delivery.Sender.deliver_batch>`: one
statement records the batch, one more per mail). A channel belongs to the thread that
consumes from it, so a thread that is done does not ack: it puts the command on the
``settled`` list, and the consumer's thread acks (or requeues) it in :meth:`Intake.settle`,
which it calls on every turn of its loop. While commands are in the threads' hands the
consumer waits for the broker at most ``SETTLE_SECONDS`` at a time, so an ack is late by a
few milliseconds at most.

A command is acked only after its attempt was recorded and its result confirmed by the
broker: the threads hand results to one publishing thread (:mod:`services.sender.results`),
which confirms them in batches and then settles their commands. One that
could not be handled (the database or the broker failed, or another thread still holds a
redelivered command) is requeued after ``REQUEUE_PAUSE_SECONDS``, never dropped. When the
consumer stops or loses its channel, commands not started yet are let go (the broker
delivers them again); on a stop the ones in the threads' hands are finished and acked first.

Acks go out many at a time: when every command up to one delivery tag is settled, one
``basic.ack`` with ``multiple`` covers them all (one frame for the broker to handle instead of
one per mail: the broker shares the machine's CPU with the sender and the SMTP server). A
command settled behind one still in a thread's hands waits for it, but at most
``HELD_ACKS_LIMIT`` do: beyond that they are acked one by one, so a slow command (a rate
limit, a slow server) never holds the prefetch window shut. Such an ack also covers every
other message of the channel up to its tag; the config events that share it are acked in their
own callbacks in this same thread, before any settle, so it never covers one still in hand.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kombu import Message

from services.sender.delivery import Done, FirstAttempt, Outcome
from services.sender.results import ResultStream
from shared.contracts.send import SendCommand, SendResult

log = logging.getLogger(__name__)

SETTLE_SECONDS = 0.005
REQUEUE_PAUSE_SECONDS = 0.5
HELD_ACKS_LIMIT = 50
BATCH_LIMIT = 32

Deliver = Callable[[list[FirstAttempt], Done], None]


@dataclass(frozen=True)
class _Job:
    message: Message
    attempt: FirstAttempt

    @property
    def key(self) -> tuple[str, str]:
        return self.attempt.command.tenant_id, self.attempt.command.request_id


class Intake:
    def __init__(self, deliver: Deliver, threads: int, amqp_url: str) -> None:
        self._deliver = deliver
        self._threads_wanted = max(1, threads)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._settled: deque[tuple[Message, Outcome]] = deque()
        self._threads: list[threading.Thread] = []
        self.results = ResultStream(amqp_url, self._confirmed)
        self.pending = 0  # submitted and not settled yet (the consumer's thread only)
        # The consumer's thread only: submitted commands in delivery order, and the ones of
        # them that are settled but not acked yet (by id), for acks with ``multiple``.
        self._in_order: deque[Message] = deque()
        self._tracked: set[int] = set()  # ids of the messages in ``_in_order``
        self._held: dict[int, Message] = {}

    @property
    def busy(self) -> bool:
        return self.pending > 0

    def start(self) -> None:
        if self._threads:
            return
        self.results.start()
        for number in range(self._threads_wanted):
            thread = threading.Thread(
                target=self._run, name=f"mailroom-sender-delivery-{number}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        log.info("sender: %d delivery threads started", self._threads_wanted)

    # --- the consumer's thread -------------------------------------------------------------

    def submit(self, message: Message, command: SendCommand, raw: dict[str, Any]) -> None:
        redelivered = bool(message.delivery_info.get("redelivered"))
        self.pending += 1
        self._in_order.append(message)
        self._tracked.add(id(message))
        self._jobs.put(_Job(message, FirstAttempt(command, raw, redelivered)))

    def settle(self) -> None:
        """Ack (or requeue) the commands whose first attempt is over."""
        if not self._settled:
            return
        while self._settled:
            message, outcome = self._settled.popleft()
            self.pending -= 1
            if outcome is Outcome.ACK and id(message) in self._tracked:
                self._held[id(message)] = message
                continue
            # A requeue at once; an ack of a command from before ``let_go`` on its own.
            self._settle_one(message, outcome)
            self._done(message)
        self._ack_settled_prefix()
        if len(self._held) > HELD_ACKS_LIMIT:
            for message in list(self._held.values()):
                self._settle_one(message, Outcome.ACK)
                self._done(message)

    def _done(self, message: Message) -> None:
        """Settled on its own: it no longer holds back the acks with ``multiple``."""
        self._held.pop(id(message), None)
        if id(message) in self._tracked:  # else submitted before a let_go
            self._tracked.discard(id(message))
            self._in_order.remove(message)

    def _ack_settled_prefix(self) -> None:
        """One ``basic.ack`` (``multiple``) for the settled commands at the front."""
        last: Message | None = None
        while self._in_order and id(self._in_order[0]) in self._held:
            last = self._in_order.popleft()
            del self._held[id(last)]
            self._tracked.discard(id(last))
        if last is None:
            return
        try:
            # Every tag up to this one on this channel is acked now or was settled before.
            last.channel.basic_ack(last.delivery_tag, multiple=True)
        except Exception as exc:  # noqa: BLE001 - its channel is gone: the broker redelivers
            log.info("sender: commands not acked (%s); the broker delivers them again", exc)

    @staticmethod
    def _settle_one(message: Message, outcome: Outcome) -> None:
        try:
            if outcome is Outcome.ACK:
                message.ack()
            else:
                message.requeue()
        except Exception as exc:  # noqa: BLE001 - its channel is gone: the broker redelivers
            log.info("sender: command not settled (%s); the broker delivers it again", exc)

    def let_go(self) -> None:
        """Forget the commands not started yet (they are not acked: the broker redelivers)."""
        # Settled ones not acked yet go first, while their channel may still be there.
        self._ack_settled_prefix()
        for message in list(self._held.values()):
            self._settle_one(message, Outcome.ACK)
        self._held.clear()
        self._tracked.clear()
        self._in_order.clear()  # those in the threads' hands are acked one by one later
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self.pending -= 1

    def drain(self, timeout: float) -> None:
        """On a stop: let the waiting commands go, finish and settle those in hand."""
        self.let_go()
        deadline = time.monotonic() + timeout
        while self.pending > 0 and time.monotonic() < deadline:
            time.sleep(SETTLE_SECONDS)
            self.settle()

    def stop(self) -> None:
        self.let_go()
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join(30)
        self._threads = []
        self.results.stop()

    # --- the delivery threads --------------------------------------------------------------

    def _run(self) -> None:
        carry: _Job | None = None  # the first of the next batch
        while True:
            first = carry if carry is not None else self._jobs.get()
            carry = None
            if first is None:
                return
            batch, keys = [first], {first.key}
            while len(batch) < BATCH_LIMIT:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._jobs.put(None)  # stop after this batch
                    break
                if job.key in keys:  # the same request twice: one after the other
                    carry = job
                    break
                batch.append(job)
                keys.add(job.key)
            self._deliver_batch(batch)

    def _deliver_batch(self, batch: list[_Job]) -> None:
        handled: set[int] = set()
        requeue: list[Message] = []

        def done(index: int, outcome: Outcome, results: list[SendResult]) -> None:
            handled.add(index)
            message = batch[index].message
            if outcome is Outcome.REQUEUE:
                requeue.append(message)
            elif not results:
                self._settled.append((message, outcome))
            else:
                # In order: the last result's confirm covers the ones before it.
                for result in results[:-1]:
                    self.results.publish(result, None)
                self.results.publish(results[-1], (message, outcome))

        try:
            self._deliver([job.attempt for job in batch], done)
        except Exception:
            log.exception("sender: could not deliver a batch now; its commands are requeued")
        requeue += [job.message for n, job in enumerate(batch) if n not in handled]
        if requeue:
            time.sleep(REQUEUE_PAUSE_SECONDS)  # what failed now will hardly work at once
            self._settled.extend((message, Outcome.REQUEUE) for message in requeue)

    def _confirmed(self, tokens: list[Any]) -> None:
        self._settled.extend(token for token in tokens if token is not None)
