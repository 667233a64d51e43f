"""The sender's supervisor: follows the SMTP servers and consumes ``mailroom.send``.

It is the sender's one kombu consumer (the :class:`~shared.worker.Worker` base: manual acks,
reconnect, SIGTERM). Config events keep its :class:`~shared.server_directory.ServerDirectory`
current, so resolution sees a change within a second, without a restart. Send commands are
read as raw bytes (any AMQP client, any content type), validated
(:func:`shared.contracts.send.parse_command`), recorded and handed to the delivery threads
(:mod:`services.sender.delivery`) before the ack. An invalid command is answered ``failed``
and kept in ``mailroom.send.dead``; it never stops the consumer. When the database or the
broker fails under a command, the command is requeued (after a short pause), never dropped.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from kombu import Message
from psycopg_pool import ConnectionPool

from services.sender.delivery import Sender
from shared.config_follower import ConfigFollower
from shared.contracts.send import InvalidCommand, parse_command
from shared.db.pool import DictConnection
from shared.email_servers import EmailServer, ServerType
from shared.settings import Settings
from shared.topology import send_queue

log = logging.getLogger(__name__)

COMMAND_PREFETCH = 100
REQUEUE_PAUSE_SECONDS = 0.5


class SenderSupervisor(ConfigFollower):
    service_name = "sender"
    server_types = (ServerType.SMTP,)

    def __init__(self, settings: Settings, pool: ConnectionPool[DictConnection]) -> None:
        super().__init__(settings, pool)
        self.sender = Sender(settings, self.directory)
        self.commands_accepted = 0

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

    def tick(self) -> None:
        super().tick()
        self.sender.tick()

    def on_server_change(self, before: EmailServer | None, after: EmailServer | None) -> None:
        super().on_server_change(before, after)
        self.sender.on_server_change(before, after)

    def run_until_signalled(self) -> None:
        try:
            super().run_until_signalled()
        finally:
            self.sender.close()

    # --- send commands -------------------------------------------------------------------------

    def handle_command(self, message: Message) -> None:
        body: bytes = message.body if isinstance(message.body, bytes) else bytes(message.body)
        try:
            try:
                command = parse_command(body)
                raw: dict[str, Any] = json.loads(body)
                self.sender.accept(command, raw)
                self.commands_accepted += 1
            except InvalidCommand as invalid:
                self.sender.reject_invalid(body, message.content_type, invalid)
        except Exception:
            log.exception("sender: could not take a send command; it is requeued")
            time.sleep(REQUEUE_PAUSE_SECONDS)
            message.requeue()
            return
        message.ack()
