"""The sender's intake: each command from ``mailroom.send`` is checked, then queued in its
server's lane.

In the consumer's thread, each command is:

1. checked: its size and shape (``shared.contracts.send``), its publisher (RabbitMQ's
   validated ``user_id`` against ``MAILROOM_SEND_PUBLISHERS``, when set) and its tenant. A
   command that fails a check is answered ``failed`` (final) and kept in ``mailroom.send.dead``;
2. routed: the SMTP server that would send it names its lane (``services.sender.lanes``); a
   command without a route goes to its tenant's lane, where its attempt fails it with the
   reason;
3. handed to the lane, which makes its first attempt (``services.sender.first_attempts``).

A command is acked only once its attempt is recorded and its results are confirmed by the
broker (``services.sender.results``: one publishing thread, many results per confirm), in the
consumer's thread (``services.sender.acks``).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from kombu import Message

from services.sender.acks import Acks
from services.sender.first_attempts import Job
from services.sender.lanes import Lanes
from services.sender.publisher import Publisher
from services.sender.resolver import NoRoute, Resolver, UnreadablePassword
from services.sender.results import ResultStream
from shared.contracts.send import InvalidCommand, SendCommand, SendResult, parse_command
from shared.contracts.send_limits import SendLimits

log = logging.getLogger(__name__)


def parse_publishers(text: str) -> dict[str, frozenset[str]] | None:
    """``MAILROOM_SEND_PUBLISHERS``: ``{"<rabbitmq user>": ["<tenant>", …] or ["*"]}``; None
    when unset (every publisher RabbitMQ lets write to ``mailroom.send`` is trusted)."""
    if not text.strip():
        return None
    parsed = json.loads(text)
    if not isinstance(parsed, dict) or not all(
        isinstance(user, str)
        and isinstance(tenants, list)
        and all(isinstance(t, str) for t in tenants)
        for user, tenants in parsed.items()
    ):
        raise ValueError('MAILROOM_SEND_PUBLISHERS must be {"<user>": ["<tenant>", …], …}')
    return {user: frozenset(tenants) for user, tenants in parsed.items()}


class Intake:
    def __init__(
        self,
        *,
        limits: SendLimits,
        publishers: dict[str, frozenset[str]] | None,
        tenant_known: Any,  # (tenant_id) -> bool
        resolver: Resolver,
        publisher: Publisher,
        lanes: Lanes[Job],
        results: ResultStream,
        acks: Acks,
    ) -> None:
        self._limits = limits
        self._publishers = publishers
        self._tenant_known = tenant_known
        self._resolver = resolver
        self._publisher = publisher
        self._lanes = lanes
        self._results = results
        self._acks = acks
        self.accepted = 0

    @property
    def busy(self) -> bool:
        return self._acks.pending > 0

    # --- the consumer's thread -------------------------------------------------------------

    def take(self, message: Message) -> None:
        body: bytes = message.body if isinstance(message.body, bytes) else bytes(message.body)
        try:
            command, raw = parse_command(body, self._limits)
            self._check_publisher(message, command)
            if not self._tenant_known(command.tenant_id):
                raise InvalidCommand(
                    f"unknown tenant {command.tenant_id!r}", command.request_id, command.tenant_id
                )
        except InvalidCommand as invalid:
            self._reject(body, message.content_type, invalid)
            message.ack()
            return
        redelivered = bool(message.delivery_info.get("redelivered"))
        self._acks.received(message)
        self._lanes.submit(self._lane_of(command), Job(message, command, raw, redelivered))
        self.accepted += 1

    def settle(self) -> None:
        self._acks.settle()

    def let_go(self) -> None:
        """The channel is going: jobs not started are forgotten (the broker redelivers them)."""
        self._acks.let_go()
        self._acks.pending -= len(self._lanes.let_go())

    # --- any thread ------------------------------------------------------------------------

    def done(self, job: Job, ack: bool, results: list[SendResult]) -> None:
        """A job is over: its results published (in order, the last one's confirm covering
        the ones before), then its command acked, or requeued at once."""
        if not results or not ack:
            self._acks.done(job.message, ack)
            return
        for result in results[:-1]:
            self._results.publish(result, None)
        self._results.publish(results[-1], (job.message, ack))

    def confirmed(self, tokens: list[Any]) -> None:
        for token in tokens:
            if token is not None:
                self._acks.done(*token)

    # --- checks ----------------------------------------------------------------------------

    def _check_publisher(self, message: Message, command: SendCommand) -> None:
        if self._publishers is None:
            return
        user = message.properties.get("user_id")
        allowed = self._publishers.get(user) if isinstance(user, str) else None
        if allowed is None or not ("*" in allowed or command.tenant_id in allowed):
            who = f"publisher {user!r}" if isinstance(user, str) else "a publisher without user_id"
            raise InvalidCommand(
                f"{who} may not send for tenant {command.tenant_id!r} (MAILROOM_SEND_PUBLISHERS)",
                command.request_id,
                command.tenant_id,
            )

    def _lane_of(self, command: SendCommand) -> str:
        """The server that would send it now (its attempt resolves again, and follows an
        admin's edit meanwhile); without one, or for a reply whose sender the database must
        name (not asked here, in the consumer's thread), its tenant."""
        if command.kind == "agent" and command.from_ is None and command.in_reply_to:
            return f"tenant:{command.tenant_id}"
        try:
            return self._resolver.resolve(command).server.id
        except UnreadablePassword as exc:
            return exc.server.id
        except NoRoute:
            return f"tenant:{command.tenant_id}"

    def _reject(self, body: bytes, content_type: str | None, error: InvalidCommand) -> None:
        """An invalid command: kept in the dead-letter queue and answered ``failed``."""
        log.warning("sender: invalid send command (request %s): %s", error.request_id, error.reason)
        self._publisher.dead_letter(
            body,
            reason=error.reason,
            request_id=error.request_id,
            tenant_id=error.tenant_id,
            content_type=content_type,
        )
        self._publisher.result(
            SendResult(
                request_id=error.request_id,
                tenant_id=error.tenant_id,
                status="failed",
                final=True,
                reason=error.reason,
                category="invalid_command",
            )
        )
