"""Benchmark: one company's dead SMTP server must not delay the others' mail.

``python -m tests.perf.sender_fairness`` (``make bench``). Twenty companies each have an SMTP
server (the same in-memory aiosmtpd sink, twenty server entries, so twenty lanes); a twenty-first
has a server that accepts connections and never greets. One sender process runs with its
defaults. Each round publishes a steady flow of commands for the twenty healthy companies, at
``BENCH_FAIR_RATE`` per second for ``BENCH_FAIR_SECONDS``, and measures each mail's latency from
its publish to its arrival at the sink (the sink's file time, just before its 250):

- baseline: the healthy flow alone;
- under the outage: the same flow after ``BENCH_FAIR_DEAD`` commands for the dead server.

The goal (issue 21): under the outage every healthy server keeps its normal latency, p99
under 1 s.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pika

from tests.perf.sender_throughput import MEMORY, ROOT, USER, setup

if TYPE_CHECKING:
    from shared.settings import Settings

HEALTHY = 20
RATE = float(os.environ.get("BENCH_FAIR_RATE", "50"))  # healthy commands per second
SECONDS = float(os.environ.get("BENCH_FAIR_SECONDS", "8"))
DEAD = int(os.environ.get("BENCH_FAIR_DEAD", "60"))


class DeadServer:
    """Accepts every connection and never says a word."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                peer, _ = self._listener.accept()
            except OSError:
                return
            self._held.append(peer)

    def close(self) -> None:
        self._listener.close()
        for peer in self._held:
            peer.close()


def prepare(settings: Settings, sink_port: int, dead_port: int, secret: str) -> None:
    from shared.db import email_servers
    from shared.db.pool import make_pool
    from shared.secrets import SecretBox
    from tests.support.sender import drain

    box = SecretBox.from_settings(settings)
    pool = make_pool(settings, max_size=2)
    with pool.connection() as conn:
        conn.execute("TRUNCATE email_servers, send_requests RESTART IDENTITY CASCADE")
        for n, port in [*((n, sink_port) for n in range(HEALTHY)), (HEALTHY, dead_port)]:
            email_servers.insert(
                conn,
                f"fair-{n}",
                {
                    "type": "smtp",
                    "name": f"server {n}",
                    "host": "127.0.0.1",
                    "port": port,
                    "tls": False,
                    "auth_type": "basic",
                    "username": USER,
                    "password_encrypted": box.encrypt(secret),
                    "sender_addresses": [f"agent{n}@acme.com"],
                    "enabled": True,
                    "role": "agent",
                },
            )
    pool.close()
    for queue in ("mailroom.send", "mailroom.send.dead", "mailroom.status.reports"):
        drain(settings.amqp_url, queue)


def command(company: int) -> dict[str, object]:
    return {
        "request_id": f"fair-{uuid.uuid4()}",
        "tenant_id": f"fair-{company}",
        "kind": "agent",
        "from": f"agent{company}@acme.com",
        "to": ["customer@example.org"],
        "subject": f"published {time.time_ns()}",
        "text": "Hello, your ticket is answered.",
    }


def publish_flow(amqp_url: str, dead_first: int) -> list[int]:
    """The dead server's commands at once, then the healthy flow at ``RATE``; the healthy
    commands' publish times (ns)."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = conn.channel()
    channel.confirm_delivery()
    for _ in range(dead_first):
        channel.basic_publish("", "mailroom.send", json.dumps(command(HEALTHY)).encode())
    published = []
    started = time.monotonic()
    for n in range(int(RATE * SECONDS)):
        time.sleep(max(0.0, started + n / RATE - time.monotonic()))
        body = command(n % HEALTHY)
        channel.basic_publish("", "mailroom.send", json.dumps(body).encode())
        published.append(int(str(body["subject"]).split()[-1]))
    conn.close()
    return published


def latencies(store: Path, count: int, timeout: float) -> list[float]:
    """Seconds from publish to arrival, for the first ``count`` healthy mails to arrive."""
    deadline = time.monotonic() + timeout
    while len(list(store.glob("*.eml"))) < count and time.monotonic() < deadline:
        time.sleep(0.2)
    found = []
    for path in store.glob("*.eml"):
        for line in path.read_bytes().splitlines():
            if line.startswith(b"Subject: published "):
                found.append((path.stat().st_mtime_ns - int(line.split()[-1])) / 1e9)
                break
    return sorted(found)


def percentile(values: list[float], fraction: float) -> float:
    return values[min(len(values) - 1, int(len(values) * fraction))]


def main() -> None:
    from tests.lab.smtp_server import SmtpLab

    bench = setup("mailroom-bench-fairness-")
    dead = DeadServer()
    with SmtpLab(bench.certs, {USER: bench.secret}, "fairness", base=MEMORY) as lab:
        print(f"sender fairness ({HEALTHY} healthy servers, {RATE:g} mails/s for {SECONDS:g} s)")
        for label, dead_commands in (("baseline, no outage", 0), ("one server dead", DEAD)):
            lab.clear()
            prepare(bench.settings, lab.port, dead.port, bench.secret)
            log = (bench.work / f"sender-{dead_commands}.log").open("ab")
            sender = subprocess.Popen(
                [str(ROOT / ".venv" / "bin" / "mailroom"), "run", "sender"],
                env={**os.environ, **bench.sender_env, "MAILROOM_LOG_LEVEL": "INFO"},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                time.sleep(3)  # connected and consuming
                published = publish_flow(bench.settings.amqp_url, dead_commands)
                found = latencies(lab.store, len(published), timeout=60)
            finally:
                sender.terminate()
                try:
                    sender.wait(45)
                except subprocess.TimeoutExpired:  # a thread still waits for the dead server
                    sender.kill()
            missing = len(published) - len(found)
            print(
                f"  {label}: {len(found)} healthy mails, p50 {statistics.median(found):.3f} s,"
                f" p99 {percentile(found, 0.99):.3f} s, max {found[-1]:.3f} s"
                + (f"; {missing} did not arrive" if missing else "")
                + (" (goal p99 < 1 s)" if dead_commands else "")
            )
    dead.close()


if __name__ == "__main__":
    main()
