"""Benchmark: the fetcher against bare protocol loops over the same mailboxes, in one run.

``make bench`` runs it (``BENCH_MAILS`` sets the mailbox size, default 5,000 mails of ~4 KB).
Everything runs on loopback against the project's own Dovecot lab:

- IMAP throughput: a bare imapclient loop (SEARCH UNSEEN, FETCH in batches of 100, STORE
  \\Seen, nothing published) vs the fetcher (the same, plus the exactly-once hand-over).
- POP3 throughput: a bare poplib RETR+DELE loop vs the fetcher.
- getmail6 (``BENCH_GETMAIL_MAILS``, default 1,000 mails) over IMAPS into a Maildir, as a
  known mail retriever to compare with. It is installed from PyPI into this venv for the
  benchmark only; it is no dependency of Mailroom.
- Latency with IDLE: APPEND -> message in the routing plan's queue, p50/p99.
- Scale: N IMAP mailboxes (``BENCH_MAILBOXES``, default 500) on one fetcher process: RSS and
  CPU while idle, and the time for a mail in any of them to arrive.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

import pika
from cryptography.fernet import Fernet
from imapclient import IMAPClient

from shared.db import email_servers, routing_plans
from shared.db.migrate import migrate
from shared.db.pool import make_pool
from shared.email_servers import ServerType
from shared.secrets import SecretBox
from shared.settings import Settings
from shared.topology import STATUS_REPORTS_QUEUE_NAME
from tests.lab.certs import LabCertificates, issue
from tests.lab.clients import LabIMAP4_SSL, LabPOP3_SSL, tls_context
from tests.lab.dovecot import LAB_USER, DovecotLab, LabUser, ensure_installed
from tests.support.environment import LAB_ALLOWED_NETWORKS, TEST_AMQP_URL
from tests.support.rabbit import ensure_vhost

MAILS = int(os.environ.get("BENCH_MAILS", "5000"))
GETMAIL_MAILS = int(os.environ.get("BENCH_GETMAIL_MAILS", "1000"))
MAILBOXES = int(os.environ.get("BENCH_MAILBOXES", "500"))
ROOT = Path(__file__).resolve().parents[2]
DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/mailroom_bench_fetcher"


def mail(n: int) -> bytes:
    head = f"From: kunde{n}@example.org\r\nSubject: Bench {n}\r\nMessage-ID: <b{n}@x>\r\n\r\n"
    return head.encode() + (b"Lorem ipsum dolor sit amet, consectetur adipiscing elit.\r\n" * 68)


def fill(
    lab: DovecotLab, user: LabUser, certs: LabCertificates, count: int, first: int = 0
) -> None:
    client = LabIMAP4_SSL("localhost", lab.imaps_port, tls_context(str(certs.ca)))
    client.login(user.name, user.password)
    for n in range(first, first + count):
        client.append("INBOX", None, None, mail(n))
    client.logout()


def bare_imap(lab: DovecotLab, user: LabUser, certs: LabCertificates) -> float:
    started = time.perf_counter()
    client = IMAPClient("localhost", port=lab.imaps_port, ssl_context=tls_context(str(certs.ca)))
    client.login(user.name, user.password)
    client.select_folder("INBOX")
    uids = client.search(["UNSEEN"])
    for i in range(0, len(uids), 100):
        chunk = uids[i : i + 100]
        fetched = client.fetch(chunk, ["BODY.PEEK[]"])
        assert len(fetched) == len(chunk)
        client.add_flags(chunk, [b"\\Seen"], silent=True)
    client.logout()
    return len(uids) / (time.perf_counter() - started)


def unsee_all(lab: DovecotLab, user: LabUser) -> None:
    lab.doveadm("flags", "remove", "-u", user.name, "\\Seen", "mailbox", "INBOX", "all")


def bare_pop3(lab: DovecotLab, user: LabUser, certs: LabCertificates) -> float:
    started = time.perf_counter()
    client = LabPOP3_SSL("localhost", lab.pop3s_port, tls_context(str(certs.ca)))
    client.user(user.name)
    client.pass_(user.password)
    count = len(client.list()[1])
    for number in range(1, count + 1):
        client.retr(number)
        client.dele(number)
    client.quit()
    return count / (time.perf_counter() - started)


def ensure_getmail() -> Path:
    """getmail6's ``getmail`` beside this interpreter, pip-installed on first use: only the
    benchmark needs it, so it is not among the project's dependencies."""
    program = Path(sys.executable).parent / "getmail"
    if not program.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "getmail6"], check=True)
    return program


def getmail(lab: DovecotLab, user: LabUser, certs: LabCertificates) -> tuple[float, str]:
    """getmail6 retrieving the user's INBOX over IMAPS into a Maildir, once, as its users run
    it: new mail only (``read_all = false``), left on the server (``delete = false``).
    Returns (mails per second, getmail's version)."""
    program = ensure_getmail()
    work = Path(tempfile.mkdtemp(prefix="bench-getmail-"))
    maildir = work / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    # getmail refuses to deliver as root: as root, it delivers as the lab's mail user.
    as_user = ""
    if os.geteuid() == 0:
        owner = pwd.getpwnam(LAB_USER)
        for path in (work, *work.rglob("*")):
            os.chown(path, owner.pw_uid, owner.pw_gid)
        as_user = f"user = {LAB_USER}\n"
    rc = work / "getmailrc"
    rc.write_text(
        "[retriever]\n"
        "type = SimpleIMAPSSLRetriever\n"
        "server = localhost\n"
        f"port = {lab.imaps_port}\n"
        f"username = {user.name}\n"
        f"password = {user.password}\n"
        'mailboxes = ("INBOX",)\n'
        f"ca_certs = {certs.ca}\n"
        "[destination]\n"
        "type = Maildir\n"
        f"path = {maildir}/\n"
        f"{as_user}"
        "[options]\n"
        "verbose = 0\n"
        "read_all = false\n"
        "delete = false\n",
        encoding="utf-8",
    )
    rc.chmod(0o600)
    started = time.perf_counter()
    subprocess.run(
        [str(program), f"--getmaildir={work}", f"--rcfile={rc}"], check=True, timeout=600
    )
    elapsed = time.perf_counter() - started
    retrieved = len(list((maildir / "new").iterdir()))
    if retrieved != GETMAIL_MAILS:
        raise RuntimeError(f"getmail retrieved {retrieved} of {GETMAIL_MAILS} mails")
    version = subprocess.run(
        [str(program), "--version"], capture_output=True, text=True, check=True
    ).stdout.split()
    return retrieved / elapsed, version[-1] if version else "?"


class QueueWatch:
    """Counts (and timestamps, by Message-ID) what arrives in a queue; consumes it."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.arrivals: dict[str, float] = {}
        self.count = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(TEST_AMQP_URL))
        channel = connection.channel()
        channel.basic_qos(prefetch_count=1000)

        def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
            self.count += 1
            message_id = (properties.headers or {}).get("x-message-id")
            if message_id:
                self.arrivals[message_id] = time.perf_counter()
            ch.basic_ack(method.delivery_tag)

        channel.basic_consume(self.queue, on_message)
        self._ready.set()
        while not self._stop.is_set():
            connection.process_data_events(time_limit=0.05)
        connection.close()

    def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.count < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.count} of {count} arrived")
            time.sleep(0.005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


class QueueLength:
    """When a queue first holds at least N messages, by polling its length every
    ``POLL_SECONDS`` (each poll costs RabbitMQ and this process CPU time beside the fetcher: at
    1 ms the POP3 run lost a fifth of its rate)."""

    POLL_SECONDS = 0.005

    def __init__(self, queue: str) -> None:
        self.queue = queue
        parameters = pika.URLParameters(TEST_AMQP_URL)
        parameters.heartbeat = 0  # idle between the polls of a long run
        self._connection = pika.BlockingConnection(parameters)
        self._channel = self._connection.channel()

    def wait_for(self, count: int, timeout: float) -> float:
        """``time.perf_counter()`` when the queue held ``count`` messages."""
        deadline = time.monotonic() + timeout
        while True:
            held = self._channel.queue_declare(self.queue, passive=True).method.message_count
            if held >= count:
                return time.perf_counter()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{held} of {count} arrived")
            time.sleep(self.POLL_SECONDS)

    def close(self) -> None:
        self._channel.queue_purge(self.queue)
        self._connection.close()


class Bench:
    def __init__(self, lab: DovecotLab, certs: LabCertificates) -> None:
        self.lab = lab
        self.certs = certs
        self.keys = Fernet.generate_key().decode()
        self.env = {
            **os.environ,
            "MAILROOM_DATABASE_URL": DATABASE_URL,
            "MAILROOM_AMQP_URL": TEST_AMQP_URL,
            "MAILROOM_SECRET_KEYS": self.keys,
            "MAILROOM_TOKEN_SIGNING_KEY": secrets.token_urlsafe(32),
            "MAILROOM_CA_BUNDLE": str(certs.ca),
            "MAILROOM_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
            "MAILROOM_ALLOWED_NETWORKS": LAB_ALLOWED_NETWORKS,
        }
        self.settings = Settings(
            database_url=DATABASE_URL,
            amqp_url=TEST_AMQP_URL,
            allowed_networks=LAB_ALLOWED_NETWORKS,
            secret_keys=self.keys,
            token_signing_key="x" * 32,
        )
        self.pool = make_pool(self.settings, max_size=4)
        self.box = SecretBox([self.keys])
        with self.pool.connection() as conn:
            conn.execute("TRUNCATE email_servers, routing_plans CASCADE")

    def mailbox(self, user: LabUser, kind: ServerType) -> str:
        """A server row and routing plan for ``user``; returns the plan's queue."""
        with self.pool.connection() as conn, conn.transaction():
            plan = routing_plans.create(conn, "bench", f"plan {user.name}")
            email_servers.insert(
                conn,
                "bench",
                {
                    "type": kind,
                    "name": user.name,
                    "host": "localhost",
                    "port": self.lab.imaps_port if kind is ServerType.IMAP else self.lab.pop3s_port,
                    "tls": True,
                    "auth_type": "basic",
                    "username": user.name,
                    "password_encrypted": self.box.encrypt(user.password),
                    "inbox_folder": "INBOX" if kind is ServerType.IMAP else None,
                    "routing_plan_id": plan.id,
                    "enabled": True,
                },
            )
        queue = f"mailroom.inbound.{plan.id}"
        connection = pika.BlockingConnection(pika.URLParameters(TEST_AMQP_URL))
        channel = connection.channel()
        channel.exchange_declare("mailroom.inbound", exchange_type="direct", durable=True)
        channel.queue_declare(queue, durable=True)
        channel.queue_bind(queue, "mailroom.inbound", routing_key=plan.id)
        connection.close()
        return queue

    def fetcher(self, log: IO[bytes] | None = None) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [str(ROOT / ".venv/bin/mailroom"), "run", "fetcher"], env=self.env, stderr=log
        )

    def timed_fetch(self, queue: str, count: int) -> tuple[float, float]:
        """(rate from process start, rate from the first mail to the last in the queue).

        The mails stay in the queue meanwhile; only its length is asked for (a passive
        declare every 5 ms: the two times are each up to 5 ms late). Consuming them in this
        process, as the routing would, took CPU time from the same two cores as the fetcher,
        Dovecot and RabbitMQ: the routing's cost, not the fetcher's (the bare loop publishes
        nothing). Same day, IMAPS: 44-46% of the bare loop in three runs consuming, 47-54% in
        five counting. They are purged after.
        """
        counter = QueueLength(queue)
        started = time.perf_counter()
        process = self.fetcher()
        try:
            first = counter.wait_for(1, timeout=60)
            last = counter.wait_for(count, timeout=600)
            total = count / (last - started)
            return total, (count - 1) / max(1e-9, last - first)
        finally:
            process.terminate()
            process.wait(20)
            counter.close()


def rss_and_cpu(pid: int, seconds: float) -> tuple[float, float]:
    def cpu() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before = cpu()
    time.sleep(seconds)
    used = (cpu() - before) / seconds
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])
    return rss_kb / 1024, used * 100


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def say(report: list[str], line: str) -> None:
    report.append(line)
    print(line, flush=True)


def main() -> int:
    ensure_installed()
    ensure_vhost()
    migrate(DATABASE_URL)
    certs = issue(Path(tempfile.mkdtemp(prefix="bench-certs-")))
    with DovecotLab(certs) as lab:
        bench = Bench(lab, certs)
        report: list[str] = []
        print("fetcher benchmark (loopback, Dovecot lab, 2 cores)", flush=True)

        imap_user = lab.new_user("imap")
        fill(lab, imap_user, certs, MAILS)
        bare = bare_imap(lab, imap_user, certs)
        unsee_all(lab, imap_user)
        started, fetched = bench.timed_fetch(bench.mailbox(imap_user, ServerType.IMAP), MAILS)
        say(
            report,
            f"IMAPS, {MAILS} mails of ~4 KB: bare imapclient loop {bare:,.0f}/s, "
            f"fetcher {fetched:,.0f}/s = {fetched / bare:.0%} of the bare loop "
            f"(goal >= 50%); {started:,.0f}/s counting the process start",
        )

        getmail_user = lab.new_user("getmail")
        fill(lab, getmail_user, certs, GETMAIL_MAILS)
        retrieved, version = getmail(lab, getmail_user, certs)
        say(
            report,
            f"getmail6 {version}, IMAPS into a Maildir, {GETMAIL_MAILS} mails: {retrieved:,.0f}/s;"
            f" the fetcher above is {fetched / retrieved:,.1f}x that "
            f"({started / retrieved:,.1f}x counting its process start)",
        )

        pop_user = lab.new_user("pop")
        fill(lab, pop_user, certs, MAILS)
        bare = bare_pop3(lab, pop_user, certs)
        fill(lab, pop_user, certs, MAILS)
        started, fetched = bench.timed_fetch(bench.mailbox(pop_user, ServerType.POP3), MAILS)
        say(
            report,
            f"POP3S, {MAILS} mails: bare poplib RETR+DELE {bare:,.0f}/s, fetcher "
            f"{fetched:,.0f}/s = {fetched / bare:.0%} of the bare loop; {started:,.0f}/s counting "
            "the process start",
        )

        say(report, latency(bench, lab, certs))
        say(report, scale(bench, lab))

    return 0


def latency(bench: Bench, lab: DovecotLab, certs: LabCertificates, samples: int = 100) -> str:
    user = lab.new_user("idle")
    queue = bench.mailbox(user, ServerType.IMAP)
    watch = QueueWatch(queue)
    process = bench.fetcher()
    try:
        time.sleep(3)  # connected and idling
        client = LabIMAP4_SSL("localhost", lab.imaps_port, tls_context(str(certs.ca)))
        client.login(user.name, user.password)
        delays = []
        for n in range(samples):
            started = time.perf_counter()
            client.append("INBOX", None, None, mail(100_000 + n))
            watch.wait_for(n + 1, timeout=30)
            delays.append(watch.arrivals[f"<b{100_000 + n}@x>"] - started)
        client.logout()
    finally:
        process.terminate()
        process.wait(20)
        watch.stop()
    return (
        f"IDLE latency APPEND -> queue over {samples} mails: p50 {percentile(delays, 0.5):.3f} s,"
        f" p99 {percentile(delays, 0.99):.3f} s, max {max(delays):.3f} s "
        "(goal p50 < 1 s, p99 < 2 s)"
    )


def reported_ok(seen: set[str], until: int, timeout: float) -> None:
    """Wait until ``until`` mailboxes have reported a successful first poll."""
    connection = pika.BlockingConnection(pika.URLParameters(TEST_AMQP_URL))
    channel = connection.channel()
    deadline = time.monotonic() + timeout
    while len(seen) < until and time.monotonic() < deadline:
        method, _, body = channel.basic_get(STATUS_REPORTS_QUEUE_NAME, auto_ack=True)
        if method is None:
            connection.sleep(0.1)
            continue
        report = json.loads(body)
        if report["ok"]:
            seen.add(report["server_id"])
    connection.close()
    if len(seen) < until:
        raise TimeoutError(f"only {len(seen)} of {until} mailboxes reported")


def purge_reports() -> None:
    connection = pika.BlockingConnection(pika.URLParameters(TEST_AMQP_URL))
    channel = connection.channel()
    channel.queue_declare(STATUS_REPORTS_QUEUE_NAME, durable=True)
    channel.queue_purge(STATUS_REPORTS_QUEUE_NAME)
    connection.close()


def ensure_inotify_instances(needed: int) -> str:
    """Dovecot pushes new mail in IDLE through inotify, one instance per IDLE session. The
    kernel's default of 128 per user makes the 129th session fall back to Dovecot's 30 s
    re-check: a limit of the lab's single mail uid, not of the fetcher."""
    path = Path("/proc/sys/fs/inotify/max_user_instances")
    current = int(path.read_text())
    if current >= needed:
        return ""
    try:
        path.write_text(str(needed))
    except OSError:
        return f" (fs.inotify.max_user_instances is {current}: Dovecot re-checks only every 30 s)"
    return f" (fs.inotify.max_user_instances raised from {current} to {needed})"


def scale(bench: Bench, lab: DovecotLab) -> str:
    note = ensure_inotify_instances(2 * MAILBOXES + 64)
    users = [lab.new_user("m") for _ in range(MAILBOXES)]
    queues = [bench.mailbox(user, ServerType.IMAP) for user in users]
    purge_reports()
    log_path = Path(tempfile.mkdtemp(prefix="mailroom-bench-fetcher-")) / "fetcher.log"
    with log_path.open("wb") as log:
        started = time.perf_counter()
        process = bench.fetcher(log)
        try:
            reported_ok(set(), until=MAILBOXES, timeout=300)
            ready = time.perf_counter() - started
            time.sleep(5)  # settle into IDLE
            rss_mb, cpu_percent = rss_and_cpu(process.pid, 10)
            delays = []
            for index in range(0, MAILBOXES, max(1, MAILBOXES // 10)):
                watch = QueueWatch(queues[index])
                appended = time.perf_counter()
                lab.append(users[index].name, mail(900_000 + index))
                watch.wait_for(1, timeout=30)
                delays.append(watch.arrivals[f"<b{900_000 + index}@x>"] - appended)
                watch.stop()
        finally:
            process.terminate()
            stopping = time.perf_counter()
            process.wait(30)
            stopped = time.perf_counter() - stopping
    # Every poller gives its lease back at once when the process stops: that burst once ran
    # out of redis-py's connections and killed pollers, a traceback each.
    tracebacks = log_path.read_text(errors="replace").count("Traceback")
    if tracebacks:
        raise SystemExit(
            f"the fetcher of {MAILBOXES} mailboxes logged {tracebacks} tracebacks: {log_path}"
        )
    return (
        f"{MAILBOXES} IMAP mailboxes on one fetcher: all logged in after {ready:.1f} s; idle "
        f"RSS {rss_mb:.0f} MB, CPU {cpu_percent:.1f} % of a core; a mail in any of them "
        f"arrived in p50 {statistics.median(delays):.2f} s, max {max(delays):.2f} s; stopped "
        f"in {stopped:.1f} s with no traceback in its log{note}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
