"""Any mail a server holds is handed over byte-identical or quarantined with a reason, and the
mail after it arrives: a generated corpus of hostile mails, through the real fetcher, over
POP3 and IMAP from the lab's Dovecot, and servers that lie about sizes or leave mails out.

Each corpus case gets a mailbox of its own holding the hostile mail and an ordinary one after
it, so that one case cannot hide another. What a mail must be is what the server serves when
asked by a plain client (``DovecotLab.served_by_*``): Dovecot itself turns bare LF into CRLF
on both protocols and NUL into 0x80 on IMAP.
"""

from __future__ import annotations

import contextlib
import random
import re
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pika
import pytest
from psycopg_pool import ConnectionPool

from shared.db.pool import DictConnection
from shared.settings import Settings
from shared.topology import INBOUND_QUARANTINE_QUEUE_NAME
from tests.lab.certs import LabCertificates
from tests.lab.dovecot import DovecotLab
from tests.support.api import ApiClient
from tests.support.fetching import Delivered, fetcher_settings, lab_mailbox, running_fetcher

MiB = 1024 * 1024
MAX_MAIL_BYTES = 6 * MiB


def _noise(seed: int, size: int) -> bytes:
    """Random bytes in random lines (any line end, any byte), the same on every run."""
    rng = random.Random(seed)
    ends = [b"\r\n", b"\n", b"\r", b""]
    parts: list[bytes] = []
    while sum(len(part) for part in parts) < size:
        parts.append(rng.randbytes(rng.randint(0, 300)) + rng.choice(ends))
    return b"".join(parts)


def _corpus() -> dict[str, bytes]:
    headers_10k = b"".join(b"X-Header-%05d: value %d\r\n" % (n, n) for n in range(10_000))
    return {
        "a 100 KB line": b"Subject: long line\r\n\r\n" + b"a" * 100_000 + b"\r\nafter it\r\n",
        "a 5 MB line": b"Subject: huge line\r\n\r\n" + b"b" * (5 * MiB) + b"\r\n",
        "10,000 headers": headers_10k + b"Subject: many\r\n\r\nbody\r\n",
        "a 1 MB header": b"X-Huge: " + b"h" * MiB + b"\r\nSubject: big header\r\n\r\nbody\r\n",
        "a 200 KB Message-ID": (
            b"Message-ID: <" + b"m" * 200_000 + b"@example.org>\r\nSubject: id\r\n\r\nbody\r\n"
        ),
        "NUL bytes": b"Subject: nul\x00here\r\nX-N: \x00\r\n\r\nab\x00cd\x00\r\n\x00\r\n",
        "bare LF": b"Subject: lf\nFrom: a@example.org\n\nline one\nline two\n",
        "bare CR": b"Subject: cr\rX-Y: y\r\nZ: a\rb\r\n\r\nbo\rdy\r\n.\r\r\n",
        "8-bit headers": b"Subject: \xc4rger \xfc\xdf\r\nFrom: \xe9@x\r\n\r\n\xff\xfe\x80\r\n",
        "broken encodings": (
            b"Subject: =?utf-8?B?!!!not base64?=\r\nContent-Type: text/plain; charset=nope\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=ZZ=\r\n=E4=\r\n=\r\n"
        ),
        "broken MIME": (
            b'Content-Type: multipart/mixed; boundary="b\r\n\r\n--other\r\n'
            b"Content-Transfer-Encoding: base64\r\n\r\n!!!\r\n--b--\r\n--b\r\n"
        ),
        "no headers": b"just a body line\r\nand another\r\n",
        "zero bytes": b"",
        "no final line break": b"Subject: x\r\n\r\nno end",
        "lines of dots": b"Subject: dots\r\n\r\n.\r\n..\r\n.x\r\n...\r\n",
        "seeded noise 1": _noise(1, 64 * 1024),
        "seeded noise 2": _noise(2, 64 * 1024),
        "above max_mail_bytes": (
            b"Subject: too big\r\nMessage-ID: <big@example.org>\r\n\r\n"
            + (b"c" * 998 + b"\r\n") * (7 * MiB // 1000)
        ),
    }


CORPUS = _corpus()
MUST_BE_QUARANTINED = {"above max_mail_bytes"}


def after(case: str) -> bytes:
    return f"Subject: after {case}\r\nMessage-ID: <after@example.org>\r\n\r\nfine\r\n".encode()


@dataclass
class Outcome:
    """What became of one mailbox's mails."""

    on_server: int
    routed: list[Delivered] = field(default_factory=list)
    quarantined: list[Delivered] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.on_server - len(self.routed) - len(self.quarantined)


@pytest.mark.parametrize("protocol", ["pop3", "imap"])
def test_every_hostile_mail_is_handed_over_or_quarantined_and_the_next_one_arrives(
    api: ApiClient,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
    dovecot: DovecotLab,
    mail_lab_certs: LabCertificates,
    protocol: str,
) -> None:
    mailboxes: dict[str, dict[str, Any]] = {}
    served: dict[str, list[bytes]] = {}
    for case, hostile in CORPUS.items():
        user = dovecot.new_user("hostile")
        dovecot.append(user.name, hostile)
        dovecot.append(user.name, after(case))
        if protocol == "pop3":
            served[case] = dovecot.served_by_pop3(user)
        else:
            served[case] = list(dovecot.served_by_imap(user).values())
        mailboxes[case] = lab_mailbox(api, dovecot, user, protocol, tls=False)
    plans = {case: server["routing_plan_id"] for case, server in mailboxes.items()}
    _purge(settings.amqp_url, INBOUND_QUARANTINE_QUEUE_NAME)

    fetching = fetcher_settings(settings, mail_lab_certs, max_mail_bytes=MAX_MAIL_BYTES)
    with running_fetcher(fetching, pool):
        outcomes = _collect(settings.amqp_url, mailboxes, plans, deadline=60, expected=2)
        time.sleep(1.5)  # more polls: nothing may come twice
        late = _collect(settings.amqp_url, mailboxes, plans, deadline=0, expected=0)

    figures = [
        f"{protocol} {case}: {len(o.routed)} handed over, {len(o.quarantined)} quarantined, "
        f"{o.lost} lost"
        for case, o in outcomes.items()
    ]
    print("\n".join(figures))
    for case, outcome in outcomes.items():
        routed = [d.body for d in outcome.routed]
        assert outcome.lost == 0, f"{case}: lost a mail; {figures}"
        assert served[case][1] in routed, f"{case}: the mail after it is missing"
        hostile = served[case][0]
        if case in MUST_BE_QUARANTINED:
            assert len(outcome.quarantined) == 1, case
        if outcome.quarantined:
            (quarantined,) = outcome.quarantined
            reason = quarantined.properties.headers["x-quarantine-reason"]
            assert reason and len(reason) <= 998, case
            assert hostile.startswith(quarantined.body[:100]), f"{case}: not its header block"
        else:
            assert routed[0] == hostile, f"{case}: not byte-identical to what the server serves"
        assert not late[case].routed and not late[case].quarantined, f"{case}: handed over twice"
    _check_the_servers_state(dovecot, mailboxes, outcomes, protocol)


def _check_the_servers_state(
    dovecot: DovecotLab,
    mailboxes: dict[str, dict[str, Any]],
    outcomes: dict[str, Outcome],
    protocol: str,
) -> None:
    """POP3: only quarantined mails stay; IMAP: all read, quarantined ones flagged."""
    for case, server in mailboxes.items():
        user, kept = server["username"], len(outcomes[case].quarantined)
        if protocol == "pop3":
            assert dovecot.count(user) == kept, case
        else:
            flags = dovecot.flags(user).values()
            assert all("\\Seen" in f for f in flags), case
            assert sum("\\Flagged" in f for f in flags) == kept, case


def test_the_header_values_of_a_huge_message_id_fit_an_amqp_frame(
    api: ApiClient,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
    dovecot: DovecotLab,
    mail_lab_certs: LabCertificates,
) -> None:
    """The 200 KB Message-ID of the corpus, seen from the consumer's side."""
    user = dovecot.new_user("longid")
    dovecot.append(user.name, CORPUS["a 200 KB Message-ID"])
    server = lab_mailbox(api, dovecot, user)
    plans = {"id": server["routing_plan_id"]}
    with running_fetcher(fetcher_settings(settings, mail_lab_certs), pool):
        outcome = _collect(settings.amqp_url, {"id": server}, plans, deadline=20, expected=1)
    (mail,) = outcome["id"].routed
    header = mail.properties.headers["x-message-id"]
    assert header.startswith("<mmmm") and header.endswith("…") and len(header) == 998
    assert mail.body == CORPUS["a 200 KB Message-ID"]


# --- servers that lie ------------------------------------------------------------------------


HONEST = [
    b"Subject: first\r\nMessage-ID: <first@example.org>\r\n\r\nfirst\r\n",
    b"Subject: liar\r\nMessage-ID: <liar@example.org>\r\n\r\n" + b"L" * (3 * MiB) + b"\r\n",
    b"Subject: third\r\nMessage-ID: <third@example.org>\r\n\r\nthird\r\n",
]


@dataclass
class FakeMail:
    uid: int
    body: bytes
    stated_size: int | None = None  # what the server claims (LIST, RFC822.SIZE)
    left_out_of_batches: bool = False  # IMAP: missing from a FETCH of several mails
    never_a_body: bool = False  # IMAP: FETCH answers it with BODY[] NIL
    flags: set[str] = field(default_factory=set)
    deleted: bool = False

    @property
    def size(self) -> int:
        return len(self.body) if self.stated_size is None else self.stated_size


class FakeServer(socketserver.ThreadingTCPServer):
    """A mail server on 127.0.0.1 for these tests, serving ``mails`` to any login."""

    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up on a cut-off answer is what these servers are for."""

    def __init__(self, handler: type[socketserver.StreamRequestHandler], mails: list[FakeMail]):
        super().__init__(("127.0.0.1", 0), handler)
        self.mails = mails
        self.commands: list[bytes] = []
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def live(self) -> list[FakeMail]:
        return [m for m in self.mails if not m.deleted]


@contextlib.contextmanager
def serving(
    handler: type[socketserver.StreamRequestHandler], mails: list[FakeMail]
) -> Iterator[FakeServer]:
    server = FakeServer(handler, mails)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class FakePop3(socketserver.StreamRequestHandler):
    """POP3 as RFC 1939 has it, with the sizes the mails claim; DELE takes effect at QUIT."""

    server: FakeServer

    def handle(self) -> None:
        self.wfile.write(b"+OK fake POP3\r\n")
        marked: set[int] = set()
        while line := self.rfile.readline():
            self.server.commands.append(line)
            verb, _, argument = line.strip().partition(b" ")
            mails = self.server.live()
            verb = verb.upper()
            if verb == b"STAT":
                self._send(b"+OK %d %d\r\n" % (len(mails), sum(m.size for m in mails)))
            elif verb in (b"LIST", b"UIDL"):
                rows = [
                    b"%d %s" % (n, b"%d" % m.size if verb == b"LIST" else b"uidl-%d" % m.uid)
                    for n, m in enumerate(mails, 1)
                ]
                self._send(b"+OK\r\n" + b"".join(r + b"\r\n" for r in rows) + b".\r\n")
            elif verb == b"RETR":
                body = mails[int(argument) - 1].body
                self._send(b"+OK\r\n" + re.sub(rb"(^|\n)\.", rb"\1..", body) + b".\r\n")
            elif verb == b"TOP":
                head = mails[int(argument.split()[0]) - 1].body.split(b"\r\n\r\n")[0]
                self._send(b"+OK\r\n" + head + b"\r\n\r\n.\r\n")
            elif verb == b"DELE":
                marked.add(mails[int(argument) - 1].uid)
                self._send(b"+OK\r\n")
            elif verb == b"QUIT":
                with self.server.lock:
                    for mail in mails:
                        mail.deleted = mail.deleted or mail.uid in marked
                self._send(b"+OK bye\r\n")
                return
            elif verb == b"CAPA":
                self._send(b"+OK\r\nUIDL\r\nTOP\r\nUSER\r\n.\r\n")
            else:
                self._send(b"+OK\r\n")

    def _send(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # the client may have hung up on a cut-off answer
            self.wfile.write(data)


class FakeImap(socketserver.StreamRequestHandler):
    """Just the IMAP the fetcher and the probe use, with the mails' claimed sizes and their
    ways of leaving a mail out; every FETCH answer also brings news of another mail's flags."""

    server: FakeServer

    def handle(self) -> None:
        self._send(b"* OK [CAPABILITY IMAP4rev1] fake IMAP\r\n")
        while line := self.rfile.readline():
            self.server.commands.append(line)
            tag, _, rest = line.strip().partition(b" ")
            words = rest.split(b" ", 3)
            verb = words[0].upper()
            if verb == b"UID":
                self._uid_command(words[1].upper(), b" ".join(words[2:]))
            elif verb == b"CAPABILITY":
                self._send(b"* CAPABILITY IMAP4rev1\r\n")
            elif verb == b"SELECT":
                top = max([m.uid for m in self.server.mails], default=0)
                self._send(
                    b"* %d EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n* OK [UIDNEXT %d] ok\r\n"
                    % (len(self.server.live()), top + 1)
                )
            elif verb == b"LOGOUT":
                self._send(b"* BYE bye\r\n" + tag + b" OK done\r\n")
                return
            self._send(tag + b" OK done\r\n")

    def _uid_command(self, verb: bytes, arguments: bytes) -> None:
        mails = self.server.live()
        if verb == b"SEARCH":
            if b"UNSEEN" in arguments.upper():
                found = [m.uid for m in mails if "\\Seen" not in m.flags]
            else:
                found = [m.uid for m in _pick(mails, arguments.split()[-1])]
            self._send(b"* SEARCH " + b" ".join(b"%d" % uid for uid in found) + b"\r\n")
        elif verb == b"FETCH":
            uid_set, _, items = arguments.partition(b" ")
            picked = _pick(mails, uid_set)
            for number, mail in enumerate(picked, 1):
                if len(picked) > 1 and mail.left_out_of_batches:
                    continue
                self._send(b"* %d FETCH (UID %d %s)\r\n" % (number, mail.uid, _items(mail, items)))
            # As servers do when another session changed flags: news of the second mail (by
            # its sequence number, without its UID).
            self._send(b"* 2 FETCH (FLAGS (\\Seen))\r\n")
        elif verb == b"STORE":
            uid_set, _, change = arguments.partition(b" ")
            for mail in _pick(mails, uid_set):
                mail.flags |= set(re.findall(r"\\\w+", change.decode()))

    def _send(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            self.wfile.write(data)


def _pick(mails: list[FakeMail], uid_set: bytes) -> list[FakeMail]:
    wanted: set[int] = set()
    top = max([m.uid for m in mails], default=0)
    for part in uid_set.decode().split(","):
        low, _, high = part.partition(":")
        end = top if high == "*" else int(high or low)
        wanted.update(range(min(int(low), end), max(int(low), end) + 1))
    return [m for m in mails if m.uid in wanted]


def _items(mail: FakeMail, items: bytes) -> bytes:
    if b"RFC822.SIZE" in items:
        return b"RFC822.SIZE %d" % mail.size
    if mail.never_a_body:
        return b"BODY[HEADER] NIL" if b"HEADER" in items else b"BODY[] NIL"
    if b"HEADER" in items:
        head = mail.body.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
        return b"BODY[HEADER] {%d}\r\n%s" % (len(head), head)
    return b"BODY[] {%d}\r\n%s" % (len(mail.body), mail.body)


def fake_mailbox(api: ApiClient, protocol: str, port: int) -> dict[str, Any]:
    return api.create(
        type=protocol,
        name=f"fake {protocol}",
        host="localhost",
        port=port,
        tls=False,
        username="someone",
        password="fake-password",
        routing_plan_id=api.routing_plan(f"plan for fake {protocol} {port}"),
        enabled=True,
    )


@pytest.mark.parametrize("protocol", ["pop3", "imap"])
def test_a_mail_larger_than_its_server_said_is_quarantined_and_the_next_one_arrives(
    api: ApiClient,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
    mail_lab_certs: LabCertificates,
    protocol: str,
) -> None:
    mails = [FakeMail(uid, body) for uid, body in enumerate(HONEST, 1)]
    mails[1].stated_size = 200
    handler = FakePop3 if protocol == "pop3" else FakeImap
    with serving(handler, mails) as fake:
        server = fake_mailbox(api, protocol, fake.port)
        _purge(settings.amqp_url, INBOUND_QUARANTINE_QUEUE_NAME)
        plans = {"liar": server["routing_plan_id"]}
        with running_fetcher(fetcher_settings(settings, mail_lab_certs), pool):
            found = _collect(settings.amqp_url, {"liar": server}, plans, deadline=30, expected=3)
            outcome = found["liar"]
            _wait_until(lambda: _settled(fake, protocol), 10)
    assert sorted(d.body for d in outcome.routed) == sorted([HONEST[0], HONEST[2]])
    (quarantined,) = outcome.quarantined
    reason = quarantined.properties.headers["x-quarantine-reason"]
    if protocol == "pop3":
        assert reason.startswith("the server sent more than the 200 bytes it listed for this")
        assert reason.endswith("it stays on the server (UIDL uidl-2)")
        assert [m.uid for m in fake.live()] == [2]  # the others deleted
    else:
        assert re.match(r"server announced \d+ bytes in its answer to UID FETCH", reason)
        assert reason.endswith("it stays on the server, flagged, in folder 'INBOX' (UID 2)")
        assert mails[1].flags == {"\\Seen", "\\Flagged"}
    assert quarantined.body == HONEST[1].split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    assert quarantined.properties.headers["x-message-id"] == "<liar@example.org>"


def test_a_uid_left_out_of_a_fetch_answer_is_fetched_on_its_own(
    api: ApiClient,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
    mail_lab_certs: LabCertificates,
) -> None:
    mails = [FakeMail(uid, body) for uid, body in enumerate(HONEST[:1] * 3, 1)]
    mails[1].left_out_of_batches = True
    with serving(FakeImap, mails) as fake:
        server = fake_mailbox(api, "imap", fake.port)
        plans = {"gap": server["routing_plan_id"]}
        with running_fetcher(fetcher_settings(settings, mail_lab_certs), pool):
            found = _collect(settings.amqp_url, {"gap": server}, plans, deadline=20, expected=3)
            outcome = found["gap"]
            _wait_until(lambda: all("\\Seen" in m.flags for m in mails), 10)
    assert len(outcome.routed) == 3 and not outcome.quarantined
    ids = sorted(d.properties.message_id.rsplit("/", 1)[1] for d in outcome.routed)
    assert ids == ["1", "2", "3"]
    assert not any("\\Flagged" in m.flags for m in mails)


def test_a_mail_whose_fetch_never_has_a_body_is_quarantined_and_flagged_not_lost(
    api: ApiClient,
    settings: Settings,
    pool: ConnectionPool[DictConnection],
    mail_lab_certs: LabCertificates,
) -> None:
    mails = [FakeMail(uid, body) for uid, body in enumerate(HONEST[:1] * 3, 1)]
    mails[1].never_a_body = True
    with serving(FakeImap, mails) as fake:
        server = fake_mailbox(api, "imap", fake.port)
        _purge(settings.amqp_url, INBOUND_QUARANTINE_QUEUE_NAME)
        plans = {"nobody": server["routing_plan_id"]}
        with running_fetcher(fetcher_settings(settings, mail_lab_certs), pool):
            outcome = _collect(
                settings.amqp_url, {"nobody": server}, plans, deadline=20, expected=3
            )
            _wait_until(lambda: all("\\Seen" in m.flags for m in mails), 10)
    routed, (quarantined,) = outcome["nobody"].routed, outcome["nobody"].quarantined
    assert [d.body for d in routed] == [HONEST[0], HONEST[0]]  # no empty mail among them
    reason = quarantined.properties.headers["x-quarantine-reason"]
    assert reason.startswith("the server answered FETCH for this mail without its body, twice")
    assert mails[1].flags == {"\\Seen", "\\Flagged"}


# --- helpers ---------------------------------------------------------------------------------


def _settled(fake: FakeServer, protocol: str) -> bool:
    if protocol == "pop3":
        return len(fake.live()) == 1
    return all("\\Seen" in m.flags for m in fake.mails)


def _wait_until(condition: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the fake server's state did not settle"
        time.sleep(0.05)


def _collect(
    amqp_url: str,
    mailboxes: dict[str, dict[str, Any]],
    plans: dict[str, str],
    deadline: float,
    expected: int,
) -> dict[str, Outcome]:
    """Take the mailboxes' mails from their routing queues and the quarantine queue until
    each has the ``expected`` number its server holds, or the time is up."""
    by_server = {server["id"]: case for case, server in mailboxes.items()}
    outcomes = {case: Outcome(on_server=expected) for case in mailboxes}
    end = time.monotonic() + deadline
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        while True:
            for case, plan in plans.items():
                while (got := channel.basic_get(f"mailroom.inbound.{plan}", auto_ack=True))[0]:
                    outcomes[case].routed.append(Delivered(bytes(got[2]), got[1]))
            while (got := channel.basic_get(INBOUND_QUARANTINE_QUEUE_NAME, auto_ack=True))[0]:
                owner = by_server.get(str(got[1].headers.get("x-email-server-id")))
                if owner is not None:
                    outcomes[owner].quarantined.append(Delivered(bytes(got[2]), got[1]))
            if all(o.lost <= 0 for o in outcomes.values()) or time.monotonic() > end:
                return outcomes
            connection.sleep(0.1)
    finally:
        connection.close()


def _purge(amqp_url: str, queue: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True)
        channel.queue_purge(queue)
    finally:
        connection.close()
