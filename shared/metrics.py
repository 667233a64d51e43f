"""Prometheus metrics of the worker processes, and the port each serves them on.

The config API and the status service serve ``/metrics`` on their HTTP port. The fetcher and
sender have no HTTP API: each serves ``/metrics`` on its own port (``MAILROOM_METRICS_HOST``,
``MAILROOM_FETCHER_METRICS_PORT``, ``MAILROOM_SENDER_METRICS_PORT``; 0 = none).

Label sets are bounded: server type (3 values), failure category (``FailureCategory``, 13) and
result (2). No label carries a server, tenant or address: per-server health is the status
service's ``mailroom_email_server_state``.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Histogram, start_http_server

log = logging.getLogger(__name__)

MAILS_FETCHED = Counter(
    "mailroom_mails_fetched_total", "Mails fetched and handed over, by server type.", ["type"]
)
POLLS = Counter("mailroom_mailbox_polls_total", "Mailbox polls, by result.", ["type", "result"])
POLL_FAILURES = Counter(
    "mailroom_mailbox_poll_failures_total", "Failed polls, by category.", ["type", "category"]
)
POLL_SECONDS = Histogram(
    "mailroom_mailbox_poll_seconds",
    "Duration of one successful poll, hand-over included.",
    ["type"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
MAILS_SENT = Counter("mailroom_mails_sent_total", "Mails accepted by an SMTP server.")
SEND_FAILURES = Counter(
    "mailroom_send_failures_total", "Failed delivery attempts, by category.", ["category"]
)
SEND_SECONDS = Histogram(
    "mailroom_send_seconds",
    "Duration of one SMTP transaction (MAIL FROM to the final reply).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
TICK_FAILURES = Counter(
    "mailroom_worker_tick_failures_total",
    "A worker's periodic work that failed (it is tried again on the next tick).",
    ["service"],
)
OAUTH_REFRESHES = Counter(
    "mailroom_oauth_refreshes_total",
    "OAuth2 access-token refreshes, by result (ok, refused = consent ended, failed).",
    ["result"],
)


def serve_metrics(host: str, port: int, service: str) -> None:
    """Serve ``/metrics`` for this process; a port in use costs the metrics, not the service."""
    if not port:
        return
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        log.warning("%s: cannot serve /metrics on %s:%d: %s", service, host, port, exc)
        return
    log.info("%s: metrics on http://%s:%d/metrics", service, host, port)
