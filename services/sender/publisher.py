"""What the sender publishes: send results, dead letters and status reports.

Every publish is persistent and confirmed by the broker. Each thread keeps its own connection
(kombu connections are not shared between threads); a dropped connection is reopened on the
next publish.

- Results: exchange ``mailroom.send.results``, routing key ``sent``/``failed`` (CONTRACT).
- Dead letters: queue ``mailroom.send.dead`` holds the command as it was published (invalid
  ones byte for byte), with ``x-reason``, ``x-request-id``, ``x-tenant-id``, ``x-smtp-code``,
  ``x-smtp-response``, ``x-attempts`` and ``x-failed-at`` headers.
- Status reports: queue ``mailroom.status.reports`` (:class:`StatusReporter` batches them).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kombu import Connection, Producer

from shared import metrics
from shared.broker import broker_connection
from shared.contracts.send import ID_MAX_CHARS, TEXT_MAX_CHARS, SendResult, cut
from shared.contracts.status_reports import FailureCategory, StatusReport
from shared.email_servers import EmailServer, ServerType
from shared.topology import (
    SEND_DEAD_LETTER_QUEUE_NAME,
    SEND_RESULTS_EXCHANGE,
    STATUS_REPORTS_QUEUE_NAME,
    instance_id,
    send_dead_letter_queue,
    status_reports_queue,
)

log = logging.getLogger(__name__)

RETRY_POLICY = {"max_retries": 5, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2}


class Publisher:
    def __init__(self, amqp_url: str) -> None:
        self._amqp_url = amqp_url
        self._local = threading.local()
        self._all: list[Connection] = []
        self._lock = threading.Lock()

    def _producer(self) -> Producer:
        producer: Producer | None = getattr(self._local, "producer", None)
        if producer is None:
            connection = broker_connection(
                self._amqp_url,
                connect_timeout=5,
                heartbeat=0,
                transport_options={"confirm_publish": True},
            )
            producer = Producer(connection)
            SEND_RESULTS_EXCHANGE(producer.channel).declare()
            send_dead_letter_queue()(producer.channel).declare()
            status_reports_queue()(producer.channel).declare()
            self._local.producer = producer
            with self._lock:
                self._all.append(connection)
        return producer

    def _publish(self, body: bytes | str, **kwargs: Any) -> None:
        producer = self._producer()
        producer.publish(
            body,
            delivery_mode=2,
            retry=True,
            retry_policy=RETRY_POLICY,
            **kwargs,
        )

    def result(self, result: SendResult) -> None:
        self._publish(
            result.model_dump_json(),
            exchange=SEND_RESULTS_EXCHANGE,
            routing_key=result.routing_key,
            content_type="application/json",
            content_encoding="utf-8",
            message_id=result.result_id,
            headers={"x-request-id": result.request_id or "", "x-final": result.final},
        )

    def dead_letter(
        self,
        body: bytes,
        *,
        reason: str,
        request_id: str | None,
        tenant_id: str | None,
        content_type: str | None = "application/json",
        smtp_code: int | None = None,
        smtp_response: str | None = None,
        attempts: int = 0,
    ) -> None:
        # Cut: the header table must fit in one AMQP frame (shared.contracts.send).
        headers: dict[str, Any] = {
            "x-reason": cut(reason, TEXT_MAX_CHARS),
            "x-request-id": cut(request_id or "", ID_MAX_CHARS),
            "x-tenant-id": cut(tenant_id or "", ID_MAX_CHARS),
            "x-attempts": attempts,
            "x-failed-at": datetime.now(UTC).isoformat(),
        }
        if smtp_code is not None:
            headers["x-smtp-code"] = smtp_code
        if smtp_response is not None:
            headers["x-smtp-response"] = cut(smtp_response, TEXT_MAX_CHARS)
        self._publish(
            body,
            exchange="",
            routing_key=SEND_DEAD_LETTER_QUEUE_NAME,
            content_type=content_type or "application/octet-stream",
            content_encoding="binary",
            headers=headers,
        )

    def status_report(self, report: StatusReport) -> None:
        self._publish(
            report.model_dump_json(),
            exchange="",
            routing_key=STATUS_REPORTS_QUEUE_NAME,
            content_type="application/json",
            content_encoding="utf-8",
            message_id=report.report_id,
        )

    def close(self) -> None:
        with self._lock:
            connections, self._all = self._all, []
        for connection in connections:
            connection.release()


@dataclass
class _Counters:
    server: EmailServer
    sent: int = 0
    failed: int = 0
    ok: bool | None = None
    reported_ok: bool | None = None
    reason: str | None = None
    category: FailureCategory | None = None
    last_flush: float = 0.0


class StatusReporter:
    """Per SMTP server: mails sent/failed since the last report, ok or failing and why.

    A change between ok and failing is reported at once; counters go out every
    ``interval`` seconds (``flush_due``). Reports of the system default server are not sent:
    it belongs to no company.
    """

    def __init__(self, publisher: Publisher, interval: float) -> None:
        self._publisher = publisher
        self._interval = interval
        self._lock = threading.Lock()
        self._servers: dict[str, _Counters] = {}
        self._worker = instance_id("sender")

    def record(
        self,
        server: EmailServer,
        *,
        ok: bool,
        sent: bool,
        reason: str | None = None,
        category: FailureCategory | None = None,
    ) -> None:
        if sent:
            metrics.MAILS_SENT.inc()
        else:
            metrics.SEND_FAILURES.labels((category or FailureCategory.INTERNAL).value).inc()
        if not server.tenant_id:
            return
        with self._lock:
            counters = self._servers.get(server.id)
            if counters is None:
                counters = self._servers[server.id] = _Counters(server)
            counters.server = server
            counters.sent += 1 if sent else 0
            counters.failed += 0 if sent else 1
            counters.ok = ok
            counters.reason = None if ok else reason
            counters.category = None if ok else category
            urgent = counters.reported_ok is not ok
        if urgent:
            self.flush(server.id)

    def flush_due(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [
                sid
                for sid, c in self._servers.items()
                if (c.sent or c.failed) and now - c.last_flush >= self._interval
            ]
        for server_id in due:
            self.flush(server_id)

    def flush(self, server_id: str) -> None:
        with self._lock:
            c = self._servers.get(server_id)
            if c is None or c.ok is None:
                return
            report = StatusReport(
                tenant_id=c.server.tenant_id,
                server_id=c.server.id,
                server_type=ServerType.SMTP,
                server_version=c.server.version,
                worker=self._worker,
                ok=c.ok,
                connected=c.ok,
                reason=c.reason,
                category=c.category,
                mails_sent=c.sent,
                mails_failed=c.failed,
            )
            c.sent = c.failed = 0
            c.reported_ok = c.ok
            c.last_flush = time.monotonic()
        try:
            self._publisher.status_report(report)
        except Exception as exc:  # noqa: BLE001 - a lost report is healed by the next one
            log.warning("status report for server %s not sent: %s", server_id, exc)
