"""Benchmark: send commands through the sender vs a bare smtplib loop, same sink, same run.

``python -m tests.perf.sender_throughput`` (``make bench``). One aiosmtpd sink in its own
process (STARTTLS + AUTH PLAIN, the lab's certificates) receives:

1. the floor: a bare ``smtplib`` loop over one reused connection sending N ready-made mails;
2. N JSON commands, all waiting in ``mailroom.send`` before one ``mailroom run sender``
   process starts, with one SMTP connection to the sink (as the bare loop);
3. the same with two sender processes (one connection each);
4. one process with the product's default of two connections per server
   (``MAILROOM_SENDER_CONNECTIONS_PER_SERVER``).

Every run is timed at the sink, from the first mail stored to the last (so neither the
benchmark's own publishing nor the sender's start-up shares the CPU with the measured part);
the sender's ``sent`` results wait in a queue and are counted, not consumed, meanwhile
(:class:`SentResults`).

The machine's speed drifts within minutes (a shared host: the bare loop alone has been seen
at 540 and 840 mails/s a few minutes apart, while the hypervisor took CPU time away from it,
"steal"), so the runs alternate (``BENCH_ROUNDS``, default 5: bare, sender, bare, sender, ...,
bare), each sender run is set against the mean of the two bare runs around it, and the median
of those ratios is the result. Every run prints the share of the machine's CPU time that was
busy and that was stolen.

Much of the bare loop's own drift is where the kernel runs it. A request-reply loop between two
processes is fastest on one CPU, where each hands over to the other without waking an idle
virtual CPU: pinned to one CPU with the sink, the bare loop ran at 1,150-1,450 mails/s, pinned
to the other CPU than the sink's 800-920, and unpinned anywhere between (three runs each, same
session; with a busy loop on the other CPU, unpinned, 1,190-1,370). The sender shares the
machine with PostgreSQL and RabbitMQ, which wake up for every mail, so it is seldom in that
luck. Nothing is pinned here: a remote SMTP server is never on the sender's CPU.

Mails are ~2 KB; the sink keeps them in memory (``/dev/shm``, see ``MEMORY``). The database
is ``mailroom_bench`` (``mailroom_bench_<name>`` with ``MAILROOM_TEST_INSTANCE=<name>``, like
the suite's), the vhost the test suite's. ``BENCH_MAILS``
changes N (default 5,000); ``BENCH_SENDERS`` which sender runs are made, as processes x SMTP
connections per process (default ``1x1,2x1,1x2``);
``BENCH_BASELINE_TREE`` also runs, in every round, the sender of another checkout, for a
before/after comparison.
Each run also prints the CPU time the sender processes and the sink spent per mail (from
``/proc``): on a 2-core machine the sink, the sender, PostgreSQL and RabbitMQ share the CPU,
so the sender's CPU per mail is what decides its rate.
"""

from __future__ import annotations

import json
import os
import secrets
import smtplib
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pika
import psycopg
from cryptography.fernet import Fernet

if TYPE_CHECKING:
    from shared.settings import Settings
    from tests.lab.certs import LabCertificates
    from tests.lab.smtp_server import SmtpLab

MAILS = int(os.environ.get("BENCH_MAILS", "5000"))
# (processes, SMTP connections per process) of each sender run in a round.
SENDERS = [
    (int(processes), int(connections or "1"))
    for processes, _, connections in (
        run.strip().partition("x")
        for run in os.environ.get("BENCH_SENDERS", "1x1,2x1,1x2").split(",")
        if run.strip()
    )
]
ROUNDS = max(1, int(os.environ.get("BENCH_ROUNDS", "5")))
ROOT = Path(__file__).resolve().parents[2]
USER = "bench@lab.test"
# The sink stores every mail it accepts (three files). On this machine's disk (ext4) creating
# them was two thirds of the sink's time and drifted with the filesystem's state: the bare loop
# ran at 630/s into a new store and at 260-390/s once it had been emptied. In memory (tmpfs) it
# is the SMTP server the issue's reference measures (aiosmtpd, about 900/s).
MEMORY = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
TENANT = "bench"


def _environment() -> dict[str, str]:
    from tests.support.environment import LAB_ALLOWED_NETWORKS, TEST_AMQP_URL, TEST_DATABASE_URL

    return {
        "MAILROOM_AMQP_URL": TEST_AMQP_URL,
        "MAILROOM_DATABASE_URL": TEST_DATABASE_URL.replace("mailroom_test", "mailroom_bench"),
        "MAILROOM_REDIS_URL": "redis://127.0.0.1:6379/14",
        "MAILROOM_SECRET_KEYS": Fernet.generate_key().decode(),
        "MAILROOM_TOKEN_SIGNING_KEY": secrets.token_urlsafe(48),
        "MAILROOM_LOG_LEVEL": "WARNING",
        "MAILROOM_ALLOWED_NETWORKS": LAB_ALLOWED_NETWORKS,
        "MAILROOM_SENDER_THREADS": os.environ.get("BENCH_SENDER_THREADS", "8"),
    }


def _variants() -> list[tuple[str, str | None]]:
    """The senders each round runs: this checkout, and with ``BENCH_BASELINE_TREE`` another
    one (e.g. ``git archive HEAD | tar -x -C /tmp/before``) as a before/after comparison in
    the same conditions."""
    baseline = os.environ.get("BENCH_BASELINE_TREE")
    return [("", None)] + ([(" [baseline]", baseline)] if baseline else [])


def command(number: int) -> dict[str, Any]:
    return {
        "request_id": f"bench-{uuid.uuid4()}",
        "tenant_id": TENANT,
        "kind": "agent",
        "from": "Bench <bench@acme.com>",
        "to": [f"customer{number % 50}@example.org"],
        "subject": f"Your ticket #{number}",
        "text": ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 30)[:1750],
    }


class SentResults:
    """A queue bound to ``mailroom.send.results`` (``sent``), read only after the timed part.

    Consuming the results while the sender ran (pika, in this process) took 0.39 ms of CPU per
    mail from the same two cores as the sender, the sink, PostgreSQL and RabbitMQ: a calling
    service's cost, not the sender's. Now the broker keeps them in this queue meanwhile and the
    benchmark only asks for its length (a passive declare, ten times a second).
    """

    NAME = "mailroom.bench.sent-results"

    def __init__(self, amqp_url: str) -> None:
        parameters = pika.URLParameters(amqp_url)
        parameters.heartbeat = 0  # idle between the polls
        self._conn = pika.BlockingConnection(parameters)
        self._channel = self._conn.channel()
        self._channel.exchange_declare("mailroom.send.results", exchange_type="topic", durable=True)
        self._channel.queue_delete(self.NAME)
        self._channel.queue_declare(self.NAME)
        self._channel.queue_bind(self.NAME, "mailroom.send.results", routing_key="sent")

    def count(self) -> int:
        return int(self._channel.queue_declare(self.NAME, passive=True).method.message_count)

    def close(self) -> None:
        self._channel.queue_delete(self.NAME)
        self._conn.close()


def arrival_rate(lab: SmtpLab) -> float:
    """Mails per second at the sink, from its first stored mail to its last (file times):
    the same yardstick for the bare loop and the sender."""
    times = sorted(path.stat().st_mtime_ns for path in lab.store.glob("*.json"))
    return (len(times) - 1) / max(1e-9, (times[-1] - times[0]) / 1e9)


def _stat_cpu_seconds(stat: str) -> float:
    """User + system CPU seconds in a ``/proc/<pid>/stat`` line."""
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux ``/proc``)."""
    try:
        return _stat_cpu_seconds(Path(f"/proc/{pid}/stat").read_text())
    except OSError:
        return 0.0


def service_cpu_seconds() -> tuple[float, float]:
    """CPU seconds so far of every PostgreSQL process and of RabbitMQ (``beam.smp``)."""
    seconds = {"postgres": 0.0, "beam.smp": 0.0}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.find("(") + 1 : text.rfind(")")]
        if name in seconds:
            seconds[name] += _stat_cpu_seconds(text)
    return seconds["postgres"], seconds["beam.smp"]


class MachineClock:
    """The whole machine's CPU time since it was made (Linux ``/proc/stat``): how much of it
    was busy, and how much the hypervisor gave to other machines (steal)."""

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> list[int]:
        return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]

    def shares(self) -> tuple[float, float]:
        """``(busy, stolen)`` shares of the CPU time since the start."""
        spent = [now - then for now, then in zip(self._read(), self._start, strict=True)]
        total = max(1, sum(spent))
        idle = spent[3] + spent[4]  # idle + iowait
        return (total - idle) / total, spent[7] / total


@dataclass
class BareRun:
    rate: float
    sink_cpu: float  # ms per mail
    busy: float
    stolen: float


def bare_run(
    lab: SmtpLab, password: str, ca: Path, mails: list[bytes], port: int | None = None
) -> BareRun:
    """The bare loop into ``lab``, directly or through whatever forwards to it on ``port``."""
    clock, sink_before = MachineClock(), cpu_seconds(lab.pid)
    bare_loop(port or lab.port, password, ca, mails)
    sink_cpu = (cpu_seconds(lab.pid) - sink_before) * 1000 / len(mails)
    assert lab.count() == len(mails)
    rate = arrival_rate(lab)
    lab.clear()
    return BareRun(rate, sink_cpu, *clock.shares())


def bare_loop(port: int, password: str, ca: Path, mails: list[bytes]) -> None:
    context = ssl.create_default_context(cafile=str(ca))
    client = smtplib.SMTP("127.0.0.1", port, timeout=30)
    client.starttls(context=context)
    client.login(USER, password)
    for number, data in enumerate(mails):
        client.sendmail("bench@acme.com", [f"customer{number % 50}@example.org"], data)
    client.quit()


@dataclass
class SenderRun:
    rate: float  # mails/s
    sent: int
    sender_cpu: float  # CPU ms per mail of the sender processes, the sink, PostgreSQL, RabbitMQ
    sink_cpu: float
    postgres_cpu: float
    rabbit_cpu: float
    busy: float  # share of the whole machine's CPU time
    stolen: float  # share of it the hypervisor gave to other machines
    commits: float  # PostgreSQL transactions committed per mail in the bench database


def committed(database_url: str) -> int:
    """Transactions committed so far in the bench database (``pg_stat_database``)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    return int(row[0]) if row else 0


def through_sender(
    env: dict[str, str],
    processes: int,
    connections: int,
    amqp_url: str,
    log_dir: Path,
    lab: SmtpLab,
    tree: str | None = None,
    mails: int = MAILS,
) -> SenderRun:
    results = SentResults(amqp_url)
    bodies = [json.dumps(command(n)).encode() for n in range(mails)]
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = conn.channel()
    channel.queue_declare("mailroom.send", durable=True)
    channel.confirm_delivery()
    for body in bodies:
        channel.basic_publish("", "mailroom.send", body, pika.BasicProperties(delivery_mode=2))
    conn.close()
    senders = []
    for n in range(processes):
        log = (log_dir / f"sender-{processes}-{n}.log").open("ab")
        senders.append(
            subprocess.Popen(
                [str(ROOT / ".venv" / "bin" / "mailroom"), "run", "sender"],
                env={
                    **os.environ,
                    **env,
                    "MAILROOM_SENDER_CONNECTIONS_PER_SERVER": str(connections),
                    "MAILROOM_LOG_LEVEL": "INFO",
                    **({"PYTHONPATH": tree} if tree else {}),
                },
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        pids = [sender.pid for sender in senders]
        deadline = time.monotonic() + 30
        while not any(lab.store.glob("*.json")):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no mail after 30 s; see the logs in {log_dir}")
            time.sleep(0.001)
        cpu_before = sum(cpu_seconds(pid) for pid in pids), cpu_seconds(lab.pid)
        commits_before = committed(env["MAILROOM_DATABASE_URL"])
        services_before = service_cpu_seconds()
        clock = MachineClock()
        deadline = time.monotonic() + 600
        while results.count() < mails and time.monotonic() < deadline:
            time.sleep(0.1)
        sender_cpu = sum(cpu_seconds(pid) for pid in pids) - cpu_before[0]
        sink_cpu = cpu_seconds(lab.pid) - cpu_before[1]
        services_after = service_cpu_seconds()
        busy, stolen = clock.shares()
        sent = results.count()
        measured = sent - 1  # from the first arrival on
        per_mail = 1000 / max(1, measured)
    finally:
        for sender in senders:
            sender.terminate()
        for sender in senders:
            sender.wait(30)
        results.close()
    time.sleep(1)  # PostgreSQL's sessions report their counts within a second of ending
    commits = committed(env["MAILROOM_DATABASE_URL"]) - commits_before
    return SenderRun(
        rate=arrival_rate(lab),
        sent=sent,
        sender_cpu=sender_cpu * per_mail,
        sink_cpu=sink_cpu * per_mail,
        postgres_cpu=(services_after[0] - services_before[0]) * per_mail,
        rabbit_cpu=(services_after[1] - services_before[1]) * per_mail,
        busy=busy,
        stolen=stolen,
        commits=commits / max(1, measured),
    )


def _label(processes: int, connections: int, variant: str) -> str:
    plural = "es" if processes > 1 else ""
    each = " each" if processes > 1 else ""
    return f"sender{variant}, {processes} process{plural} x {connections} conn.{each}"


def _print_bare(run: BareRun) -> None:
    print(
        f"bare smtplib loop, one reused connection: {run.rate:6.0f} mails/s"
        f"  (CPU per mail: sink {run.sink_cpu:.2f} ms; machine {run.busy:.0%} busy,"
        f" {run.stolen:.0%} stolen)"
    )


def prepare(settings: Settings, port: int, secret: str) -> None:
    """Empty bench database and queues, and the one SMTP server of the bench's company: the
    sink (or whatever forwards to it) on ``port``, STARTTLS and AUTH PLAIN as ``USER``."""
    from shared.db import email_servers
    from shared.db.pool import make_pool
    from shared.secrets import SecretBox
    from tests.support.sender import drain

    pool = make_pool(settings, max_size=2)
    with pool.connection() as conn:
        conn.execute("TRUNCATE email_servers, send_requests RESTART IDENTITY CASCADE")
        email_servers.insert(
            conn,
            TENANT,
            {
                "type": "smtp",
                "name": "bench sink",
                "host": "127.0.0.1",
                "port": port,
                "tls": False,
                "auth_type": "basic",
                "username": USER,
                "password_encrypted": SecretBox.from_settings(settings).encrypt(secret),
                "sender_addresses": ["bench@acme.com"],
                "enabled": True,
                "role": "agent",
            },
        )
    pool.close()
    for queue in ("mailroom.send", "mailroom.send.dead", "mailroom.status.reports"):
        drain(settings.amqp_url, queue)


@dataclass(frozen=True)
class Setup:
    """What every sender benchmark starts from: its database and vhost ready, a directory for
    logs, the lab's certificates, the sink's password and the sender processes' environment."""

    settings: Settings
    work: Path
    certs: LabCertificates
    secret: str
    sender_env: dict[str, str]

    def mails(self, count: int) -> list[bytes]:
        """The benchmark's commands as ready-made mails, for the bare loop."""
        from services.sender.mime import build
        from shared.contracts.send import SendCommand

        return [
            build(SendCommand.model_validate(command(n)), "Bench <bench@acme.com>").data
            for n in range(count)
        ]


def setup(prefix: str) -> Setup:
    env = _environment()
    os.environ.update(env)
    from shared.db.migrate import migrate
    from shared.settings import Settings
    from tests.lab.certs import issue
    from tests.support.leaks import password
    from tests.support.rabbit import ensure_vhost

    ensure_vhost()
    settings = Settings()
    migrate(settings.database_url)
    work = Path(tempfile.mkdtemp(prefix=prefix))
    certs = issue(work / "certs")
    return Setup(
        settings, work, certs, password("bench"), {**env, "MAILROOM_CA_BUNDLE": str(certs.ca)}
    )


def main() -> None:
    from tests.lab.smtp_server import SmtpLab

    bench = setup("mailroom-bench-sender-")
    settings, work, certs, secret = bench.settings, bench.work, bench.certs, bench.secret
    sender_env = bench.sender_env
    with SmtpLab(certs, {USER: secret}, "bench", base=MEMORY) as lab:
        prepare(settings, lab.port, secret)
        mails = bench.mails(MAILS)
        size = sum(len(m) for m in mails) / len(mails)
        bares = [bare_run(lab, secret, certs.ca, mails)]
        rounds: list[list[tuple[int, int, str, SenderRun, int]]] = []
        for _ in range(ROUNDS):
            runs = []
            for processes, connections in SENDERS:
                for variant, tree in _variants():
                    run = through_sender(
                        sender_env, processes, connections, settings.amqp_url, work, lab, tree
                    )
                    runs.append((processes, connections, variant, run, lab.count()))
                    lab.clear()
            rounds.append(runs)
            bares.append(bare_run(lab, secret, certs.ca, mails))
    print(f"mails: {MAILS} of {size:.0f} bytes, aiosmtpd sink with STARTTLS + AUTH PLAIN")
    ratios: dict[tuple[int, int, str], list[float]] = {}
    for number, runs in enumerate(rounds):
        before, after = bares[number], bares[number + 1]
        reference = (before.rate + after.rate) / 2
        if number == 0:
            _print_bare(before)
        for processes, connections, variant, run, arrived in runs:
            ratio = run.rate / reference
            ratios.setdefault((processes, connections, variant), []).append(ratio)
            label = f"  {_label(processes, connections, variant)}:"
            print(
                f"{label:<45}{run.rate:6.0f} mails/s = {ratio:4.0%} of the bare loops around it"
                f"  ({run.sent} sent, {arrived} arrived; CPU per mail: sender"
                f" {run.sender_cpu:.2f} ms, sink {run.sink_cpu:.2f}, PostgreSQL"
                f" {run.postgres_cpu:.2f}, RabbitMQ {run.rabbit_cpu:.2f} ms; PostgreSQL commits"
                f" per mail {run.commits:.2f}; machine {run.busy:.0%} busy,"
                f" {run.stolen:.0%} stolen)"
            )
        _print_bare(after)
    for (processes, connections, variant), values in ratios.items():
        print(
            f"{_label(processes, connections, variant)}: median"
            f" {statistics.median(values):.0%} of the bare loop over {len(values)} rounds"
            f" ({', '.join(f'{v:.0%}' for v in values)}; each against the mean of the bare"
            " runs before and after it)"
        )
    print(f"logs: {work}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
