"""The sender's supervisor: follows the SMTP servers and consumes ``mailroom.send``.

It is the sender's one kombu consumer (the :class:`~shared.worker.Worker` base: manual acks,
reconnect, SIGTERM). Config events keep its :class:`~shared.server_directory.ServerDirectory`
current, so resolution sees a change within a second, without a restart. Send commands are
read as raw bytes (any AMQP client, any content type), validated
(:func:`shared.contracts.send.parse_command`) and handed to the intake's delivery threads
(:mod:`services.sender.intake`), which make the first attempt; the command is acked after it
(:mod:`services.sender.delivery`). An invalid command is answered ``failed`` and kept in
``mailroom.send.dead``; it never stops the consumer. When the database or the broker fails
under a command, the command is requeued (after a short pause), never dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu import Message
from psycopg_pool import ConnectionPool

from services.sender.delivery import Sender
from services.sender.intake import REQUEUE_PAUSE_SECONDS, SETTLE_SECONDS, Intake
from shared.config_follower import ConfigFollower
from shared.contracts.send import InvalidCommand, parse_command
from shared.contracts.send_limits import SendLimits
from shared.db.pool import DictConnection
from shared.email_servers import EmailServer, ServerType
from shared.settings import Settings
from shared.topology import send_queue

log = logging.getLogger(__name__)

COMMAND_PREFETCH = 200
TICK_SECONDS = 0.25
STOP_DRAIN_SECONDS = 30.0


class SenderSupervisor(ConfigFollower):
    service_name = "sender"
    server_types = (ServerType.SMTP,)

    def __init__(self, settings: Settings, pool: ConnectionPool[DictConnection]) -> None:
        super().__init__(settings, pool)
        self.sender = Sender(settings, self.directory)
        self.intake = Intake(self.sender.deliver_batch, settings.sender_threads, settings.amqp_url)
        self.limits = SendLimits.from_settings(settings)
        self.commands_accepted = 0
        self._last_tick = 0.0

    # --- plumbing ------------------------------------------------------------------------------

    def get_consumers(self, consumer_cls: Any, channel: Any) -> list[Any]:
        consumers = super().get_consumers(consumer_cls, channel)
        # on_message: the raw AMQP message, undecoded, whatever its content type says.
        consumers.append(
            consumer_cls(
                queues=[send_queue()],
                on_message=self.handle_command,
                prefetch_count=COMMAND_PREFETCH,
            )
        )
        return consumers

    def on_connected(self) -> None:
        super().on_connected()  # resync first: deliveries resolve against a full directory
        self.sender.start_worker()
        self.intake.start()

    def tick(self) -> None:
        # Called on every turn of the consumer's loop: acks first, the rest now and then.
        self.intake.settle()
        now = time.monotonic()
        if now - self._last_tick >= TICK_SECONDS:
            self._last_tick = now
            super().tick()
            self.sender.tick()

    def consume(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """kombu's consumer loop, waiting for the broker only briefly while acks are due."""
        safety_interval = kwargs.pop("safety_interval", 1)
        kwargs.pop("limit", None)
        kwargs.pop("timeout", None)
        with self.consumer_context(**kwargs) as (conn, _channel, _consumers):
            while not self.should_stop:
                self.on_iteration()
                wait = SETTLE_SECONDS if self.intake.busy else safety_interval
                try:
                    conn.drain_events(timeout=wait)
                except TimeoutError:
                    conn.heartbeat_check()
                except OSError:
                    if not self.should_stop:
                        raise
                else:
                    yield

    @contextmanager
    def extra_context(self, connection: Any, channel: Any) -> Iterator[None]:
        """Around consuming on one channel: its unsettled commands end with it."""
        try:
            yield
        finally:
            if self.should_stop:
                self.intake.drain(STOP_DRAIN_SECONDS)
            else:
                self.intake.let_go()  # the channel is gone: the broker redelivers them

    def on_server_change(self, before: EmailServer | None, after: EmailServer | None) -> None:
        super().on_server_change(before, after)
        self.sender.on_server_change(before, after)

    def run_until_signalled(self) -> None:
        try:
            super().run_until_signalled()
        finally:
            self.intake.stop()
            self.sender.close()

    # --- send commands -------------------------------------------------------------------------

    def handle_command(self, message: Message) -> None:
        body: bytes = message.body if isinstance(message.body, bytes) else bytes(message.body)
        try:
            try:
                command, raw = parse_command(body, self.limits)
                if not self.sender.tenant_known(command.tenant_id):
                    raise InvalidCommand(
                        f"unknown tenant {command.tenant_id!r}",
                        command.request_id,
                        command.tenant_id,
                    )
            except InvalidCommand as invalid:
                self.sender.reject_invalid(body, message.content_type, invalid)
                message.ack()
                return
        except Exception:
            log.exception("sender: could not take a send command; it is requeued")
            time.sleep(REQUEUE_PAUSE_SECONDS)
            message.requeue()
            return
        self.intake.submit(message, command, raw)
        self.commands_accepted += 1
