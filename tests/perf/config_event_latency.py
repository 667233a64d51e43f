"""Benchmark: time from an API write to its config event arriving at a consumer.

``make bench`` runs it. It starts a real ``mailroom run config-api`` process (own database
``mailroom_bench``, the test vhost), makes 1,000 PATCH writes over HTTP one after another, and
times each event's arrival at a plain pika consumer. Two baselines are measured in the same
run: the source document's promise (30 s) and the floor of the path — a bare pika publish with
a broker confirm, consumed by the same consumer — so the ratio shows what the outbox costs.
"""

from __future__ import annotations

import os
import secrets
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2
import pika
from cryptography.fernet import Fernet

from shared.db.migrate import migrate
from shared.tokens import MANAGE, mint_token
from tests.support.environment import TEST_AMQP_URL
from tests.support.rabbit import ensure_vhost
from tests.support.tcp import closed_port

WRITES = int(os.environ.get("BENCH_WRITES", "1000"))
PROMISE_SECONDS = 30.0
ROOT = Path(__file__).resolve().parents[2]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


class Arrivals:
    """Arrival time of each (server_id, version) at a consumer of ``mailroom.config``."""

    def __init__(self) -> None:
        self.times: dict[tuple[str, int], float] = {}
        self.raw: dict[bytes, float] = {}
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Arrivals:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        import json

        conn = pika.BlockingConnection(pika.URLParameters(TEST_AMQP_URL))
        channel = conn.channel()
        channel.exchange_declare("mailroom.config", exchange_type="topic", durable=True)
        queue = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(queue, "mailroom.config", routing_key="#")

        def on_message(ch: object, method: object, props: object, body: bytes) -> None:
            now = time.perf_counter()
            if body.startswith(b"baseline:"):
                self.raw[body] = now
                return
            event = json.loads(body)
            self.times[(event["server_id"], event["version"])] = now

        channel.basic_consume(queue, on_message, auto_ack=True)
        self._ready.set()
        while not self._stop.is_set():
            conn.process_data_events(time_limit=0.05)
        conn.close()

    def wait(self, key: tuple[str, int] | bytes, timeout: float = 10.0) -> float:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            found = self.raw.get(key) if isinstance(key, bytes) else self.times.get(key)
            if found is not None:
                return found
            time.sleep(0.0002)
        raise TimeoutError(f"no event for {key!r}")


def bare_publish_latencies(arrivals: Arrivals, count: int) -> list[float]:
    """The floor: publish with a confirm straight to the exchange, consumed by the same tap."""
    conn = pika.BlockingConnection(pika.URLParameters(TEST_AMQP_URL))
    channel = conn.channel()
    channel.confirm_delivery()
    latencies = []
    for i in range(count):
        body = f"baseline:{i}".encode()
        started = time.perf_counter()
        channel.basic_publish("mailroom.config", "bench.baseline", body)
        latencies.append(arrivals.wait(body) - started)
    conn.close()
    return latencies


def main() -> int:
    database_url = "postgresql://postgres@127.0.0.1:5432/mailroom_bench"
    ensure_vhost()
    migrate(database_url)
    port = closed_port()
    token_key = secrets.token_urlsafe(48)
    env = {
        **os.environ,
        "MAILROOM_DATABASE_URL": database_url,
        "MAILROOM_AMQP_URL": TEST_AMQP_URL,
        "MAILROOM_SECRET_KEYS": Fernet.generate_key().decode(),
        "MAILROOM_TOKEN_SIGNING_KEY": token_key,
        "MAILROOM_API_PORT": str(port),
        "MAILROOM_LOG_LEVEL": "WARNING",
    }
    api = subprocess.Popen([str(ROOT / ".venv/bin/mailroom"), "run", "config-api"], env=env)
    arrivals = Arrivals().start()
    base = f"http://127.0.0.1:{port}"
    token = mint_token(
        token_key, tenant_id="bench", permissions=[MANAGE], subject="bench", ttl_seconds=3600
    )
    try:
        with httpx2.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}) as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if http.get("/healthz").status_code == 200:
                        break
                except httpx2.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("config API did not start")
                time.sleep(0.1)
            server = http.post(
                "/api/v1/email-servers", json={"type": "smtp", "name": "bench", "host": "h.de"}
            ).json()
            arrivals.wait((server["id"], 1))
            from_commit, from_request = [], []
            for i in range(WRITES):
                started = time.perf_counter()
                answer = http.patch(
                    f"/api/v1/email-servers/{server['id']}", json={"description": f"write {i}"}
                )
                answered = time.perf_counter()
                arrived = arrivals.wait((server["id"], answer.json()["version"]))
                from_commit.append(max(0.0, arrived - answered))
                from_request.append(arrived - started)
            http.delete(f"/api/v1/email-servers/{server['id']}")
        floor = bare_publish_latencies(arrivals, WRITES)
    finally:
        arrivals.stop()
        api.terminate()
        api.wait(10)

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:8.2f} ms"

    p50, p99 = percentile(from_request, 0.50), percentile(from_request, 0.99)
    print(f"config event latency over {WRITES} API writes (PATCH over HTTP, one at a time)")
    print(
        f"  write request start -> event at consumer: p50 {ms(p50)}  p99 {ms(p99)}  "
        f"max {ms(max(from_request))}"
    )
    print(
        f"  API answer received -> event at consumer: p50 {ms(percentile(from_commit, 0.5))}  "
        f"p99 {ms(percentile(from_commit, 0.99))}"
    )
    floor50, floor99 = percentile(floor, 0.5), percentile(floor, 0.99)
    print(
        f"  baseline, bare pika publish+confirm -> consumer: p50 {ms(floor50)}  p99 {ms(floor99)}"
    )
    print(
        f"  ratio p99 / goal 200 ms: {p99 / 0.2:.3f}   ratio p99 / promise 30 s: "
        f"{p99 / PROMISE_SECONDS:.5f}   ratio p50 / bare publish p50: {p50 / floor50:.1f}x"
    )
    print(f"  mean {statistics.mean(from_request) * 1000:.2f} ms")
    return 0 if p99 < 0.2 else 1


if __name__ == "__main__":
    sys.exit(main())
