"""Delivering send commands: PostgreSQL makes each happen at most once; dramatiq retries.

**Where an attempt runs, and why.** The public contract is plain JSON on ``mailroom.send``
(any AMQP client), which dramatiq cannot read: its messages are its own envelope. So the
sender's kombu consumer (:mod:`services.sender.supervisor`) validates each command and hands
it to the intake's delivery threads (:mod:`services.sender.intake`), which make the **first
attempt** themselves, a batch of waiting commands at a time (:meth:`Sender.deliver_batch`);
the command is acked once that attempt is recorded and its result published. Only a command
that must **wait and try again** goes to dramatiq: the attempt records the new owner and the
command (a row keeps none before: the first attempt has it in hand, and a crash brings it
again), enqueues ``deliver(tenant_id, request_id)`` on the internal queue
``mailroom.sender.deliver`` (``RabbitmqBroker``, publisher confirms) with a backoff delay
(dramatiq's ``.DQ`` delay queue), and dramatiq's worker threads make every later attempt;
its ``Retries`` middleware re-enqueues a temporarily failed one (``dramatiq.Retry``) with
exponential backoff and jitter. The deadline (``MAILROOM_SENDER_RETRY_DEADLINE_SECONDS``
after the command arrived) is checked by the delivery itself, which turns the last temporary
failure into a final one. Only ``Retries`` and ``CurrentMessage`` are installed: dramatiq's
default ``TimeLimit`` would interrupt a thread in the middle of an SMTP DATA.

The first design sent every command through dramatiq. The benchmark
(``tests/perf/sender_throughput.py``) measured it at 19-23% of a bare smtplib loop: per mail a
second publish with its confirm, a second consume and ack (pika), six SQL round trips, and
the one SMTP connection held during a seventh (the commit before DATA), all on a 2-core
machine that also runs the SMTP server, RabbitMQ and PostgreSQL. Nearly every command is
delivered at its first attempt, and dramatiq's queue only carried it to a thread of the same
process. Then a mail cost three SQL statements (lock and record; the commit before DATA,
overlapped with MAIL and RCPT; finish and unlock). Now the commands a thread takes together
are locked and recorded by one statement, and a mail's ``sent`` rides along with the same
thread's next "DATA starts" mark (:class:`_Lane`): about one statement and one commit per
mail. On the benchmark's machine that took PostgreSQL from about 1.3 to 0.8-1.0 ms of CPU per
mail and the sender from about 3.3 to 1.7-2.3 ms (the same run, alternating with the bare
loop: median 39% → 53% of its rate).

Watching the SMTP connection on the wire (tcpdump, benchmark) showed where the rest went: the
sender took 1.3 ms between the server's 250 and the next MAIL FROM (the bare loop 0.3 ms),
because the connection passed to another thread after every mail, which then built its MIME
and started its mark first. Now a thread keeps the connection for its whole batch
(:class:`~services.sender.connections.Turn`), prepares each mail (route, MIME) before its turn
(:class:`_BuiltAhead`), and starts the mark only once MAIL FROM is on
its way; ``main`` shortens Python's GIL switch interval so that a thread whose SMTP reply has
arrived does not wait behind one that is computing. The mark then had MAIL and RCPT to commit
in and DATA still waited for it (1.0 ms against 0.25 ms in the bare loop): only the mail's
final ``.`` waits for it now (step 2), which gave 61-63% of the bare loop against 42-52% in
the same rounds.

Then the benchmark's sink moved into memory (it had spent two thirds of its time creating
files), which doubled the bare loop's rate to 700-800 mails/s and made the sender's own time
count twice as much. Four more steps, each measured in the same rounds: the mail and its final
``.`` in one write when the mark is committed by then (0.36 ms less per mail on the wire); the
results published in batches that linger 20 ms (RabbitMQ's CPU per mail halved); the mark as a
prepared statement (PostgreSQL's CPU per mail down by a third); each next mail built while the
server decides on the one before (:class:`_BuiltAhead`), and the previous mail's completion
moved there too. In the same rounds one process went from a median of 44% to 62% of the bare
loop (290-334 → 400-444 mails/s); over five rounds it reached 59%, two processes 66%. Then
the protocol alone between a 250 and the next MAIL FROM (the accepted mail's result and
reports made while the server answers that MAIL FROM, :meth:`_Lane.report_later`; routes kept
per directory generation; dot-stuffing without a regex), a results thread that sleeps while a
batch fills, and AMQP reads that take many frames at once (:mod:`shared.broker`): on the wire
250 → MAIL FROM fell from 0.13-0.16 to 0.09 ms (median), the sender's CPU per mail to
0.74-1.1 ms; the median over five rounds stayed at 59% (46-63%), with the bare loop at
960-1,050 mails/s instead of 680-840 (the machine was faster that day: 450-660 mails/s).

Where a mail's time goes now (benchmark, one connection, 2 cores). Per thread (``/proc``): the
delivery threads 0.65 ms of CPU per mail, the consumer 0.14, the results thread 0.09. Of the
delivery threads' share, about 0.33 ms is the SMTP exchange itself, as in the bare loop (every
TLS read or write of a reply or command costs about 40 us, nearly all of it in the kernel), and
0.05-0.07 ms sending the mark and reading its outcome. On the wire, the sender's reaction to a
reply now has the bare loop's median except after a mail's 250 (0.09 against 0.06 ms); what it
adds is tails (means twice the medians: the thread that holds the connection waits for a CPU
or the GIL while PostgreSQL, RabbitMQ and its other threads run), and the SMTP server answers
more slowly beside them. None of it is one cost: with the mark replaced by ``SELECT 1`` (an
experiment, not at-most-once) one process went from 56% to 64% of the bare loop; a stripped
loop that consumed, validated, built and sent without PostgreSQL and without results reached
79%, and 58% once it published each result. With two connections (the default), the sender
overlaps one mail's exchange with the other's, and one process sends 690-830 mails/s, 67-81% of
the bare loop's rate on its one connection.

Step by step (one connection, the same benchmark; each step's wall time measured in
:func:`~shared.mail.smtp.send_transaction`, once driven by the sender and once by a bare loop
over the same function): the server takes longer to answer the sender, not the sender to
react. From MAIL FROM written to its reply 0.81 ms against 0.45 ms, RCPT 0.61 against 0.50,
the final ``.`` to its 250 0.72 against 0.59; DATA's 354 as fast as the bare loop's. The first
and the last are where PostgreSQL works on the mark (sending it took 0.21 ms of wall time for
0.07 ms of CPU: the woken backend runs on the sender's CPU first) and where the next mail is
built (0.25 ms of CPU then, 0.08 ms on an idle machine), so three tasks want the two CPUs while
the server answers. The mark waited for its commit before the final ``.`` in 6% of the mails
(1 ms each, 2-3% of the time). A commit here costs 0.46 ms of wall time and 0.18 ms of the
backend's CPU, 0.17 and 0.08 without waiting for the disk; with ``synchronous_commit = off``
for the sender's sessions (an experiment: after a crash of PostgreSQL a mail could then go out
twice) the median over three rounds went from 59% to 65%. Reporting the previous mail before
sending the mark instead of after made no difference (61% and 60%, four rounds each). A new
row no longer keeps its command (only a retry needs it; migration 0007): PostgreSQL's CPU per
mail went from 0.77 to 0.69 ms (median of six alternating rounds, lower in each), one
process's median from 63% to 67% of the bare loop (ahead in four rounds of six, on a day the
bare loop ran at 380-444 mails/s).

What remains is the machine, not one cost (a day when the bare loop ran at 950-1,110
mails/s and the sender at 600-690, 57-65% of it). The sender's Python holds the GIL only about
a fifth of the time (py-spy), and a prototype that moved the AMQP consumer, the results and the
acks into a process of their own, the delivery threads talking to it over a socket, ran at 60%
against 61% (three alternating rounds): the SMTP thread does not wait for the other threads.
It waits for the CPUs: the sink, the sender, PostgreSQL (0.33 ms and 4.5 wake-ups per mail,
``perf sched``) and RabbitMQ share two, the slow SMTP cycles come in bursts every 15-20 ms (when
a batch of results is confirmed, its commands acked and the next deliveries arrive), and in
them every step is slower, the server's replies most. Single-threaded loops over the same
function, against the bare loop in the same rounds, bound what any design can reach there:
with the real mark and ``sent`` per mail 81-85%, with each command also parsed and its mail
built 72%, also consumed and acked 66%, also with a result published 56%. With the server
10 ms away instead (``tests/perf/sender_far_server.py``) the round trips decide and the sender
runs at 99-100% of the bare loop on one connection.

**Never twice (the state machine of a request).** ``sending`` → ``sent`` | ``failed``, with
``retry_wait`` between attempts (``received`` is only found in rows of older versions); each
step is committed before the next network step:

1. An intake thread takes a PostgreSQL advisory lock on each request of its batch (held on
   its connection for the whole attempt: if the process dies, PostgreSQL releases it) and,
   in the same statement, inserts the rows already claimed (``sending``, attempt 1). A
   dramatiq attempt takes the lock, checks that its message owns the row
   (``owner_message_id``) and claims it (``sending``, one more attempt).
2. Once MAIL FROM is written it sends ``data_started_at``; the commit happens while MAIL,
   RCPT and DATA are answered and the mail is written, and the mail's final ``.`` waits for
   it. Only that line hands the mail over: a server accepts nothing before it (RFC 5321
   4.1.1.4), and a connection dropped before it delivers nothing.
3. After the server's reply it commits ``sent`` / ``failed`` / ``retry_wait`` (and releases
   the lock), publishes the result, and only then is the command (or dramatiq message)
   acked. A first attempt's ``sent`` is committed with the thread's next statement (its
   next mark, or on its own before anything that may wait); the ack waits for that commit.
   If that statement fails, the ``sent`` is recorded on a fresh connection, or the command
   comes again and is closed as uncertain (below): never sent twice.

After a crash the command (or the dramatiq message) is delivered again and finds the row
``sending``:

- without ``data_started_at``: nothing was handed over, the attempt is simply made again;
- with it: the mail may have been accepted (the typical case: the worker died right after the
  server's 250). It is **not** sent again. The request is closed as ``failed``, final, with
  ``uncertain: true`` and a reason that says so, and kept in the dead-letter queue for a
  human. The trade-off: a crash in that window (from the mark's commit to the server's
  reply, one mail per connection: milliseconds) can lose a mail that was not accepted after
  all, but it can never deliver one twice, which is what the contract's "at most once"
  demands. A connection that breaks after the final ``.`` without a reply is treated the
  same way.

A command that comes again is told apart by AMQP's ``redelivered`` flag. A *redelivered*
command is ours, back after a crash or a requeue: it heals its row (a final result is
published again, a ``sending`` row is retried or closed as uncertain as above, a
``retry_wait`` row gets a new dramatiq message as its owner). A *published again* command
(same ``request_id``, e.g. a client's retry) changes nothing and is dropped: results are at
least once, mails at most once.

**A command that keeps failing.** An attempt that fails unexpectedly requeues its command.
So that one bad command cannot come back forever and take its neighbours with it,
:meth:`Sender.deliver_batch` tells the errors of a service that is away
(``INFRASTRUCTURE_ERRORS``: never held against a command; the batch's commands not handled yet
are requeued with it) from the rest, which may be a command's doing. When the statement
recording a batch fails so, each of its commands is tried on its own; when one command's
attempt does, the commands after it go on at once, so it holds none up. A command that failed
so ``POISON_STRIKES`` times, over at least ``POISON_MIN_SECONDS``, is closed as ``failed``
(``internal_error``; uncertain instead when its mail may have been handed over) and
dead-lettered, unless it is not the only command to fail so within ``WIDESPREAD_SECONDS``: a
fault every mail meets is the sender's, and failing them all for good would turn a fixable
outage into lost mail. What is known not to be a command's fault is handled as such: a stored
password no key opens (:class:`UnreadablePassword`) is a temporary authentication failure of
its server.

A retry (dramatiq) that fails unexpectedly is retried with dramatiq's backoff and counted by
the same rule, its strikes in a row carried in its message's options (its attempts may be
hours apart and made by any process; one that gets as far as the server's answer clears them),
and another request failing so is looked for over twice the longest backoff instead of a
minute; at the ``POISON_STRIKES``-th the request is closed as above. An
error of a service that is away is retried for as long as the service is away: it ends no
request, and the delivery that runs once the service is back finds the row as it was left
(``retry_wait``, or ``sending`` from the attempt that was cut short) and goes on from there.

**A retry that never comes.** Only its dramatiq message moves a ``retry_wait`` request on;
if the message is lost (a queue purged, a re-enqueue that failed after dramatiq acked), the
request would wait for ever. Every retry scheduled records when it is due (``send_retries``,
a table of its own so that a first attempt never touches it), and once a minute
:meth:`Sender.sweep_overdue_retries` takes over, with a new message, each request whose retry
is overdue by the longest backoff (at least five minutes); a message that was only late then
finds the request owned by another and ends.
"""

from __future__ import annotations

import enum
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any, cast

import amqp.exceptions
import dramatiq
import dramatiq.errors
import kombu.exceptions
import psycopg
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.common import compute_backoff
from dramatiq.middleware import CurrentMessage, Retries
from psycopg import pq
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from services.sender.connections import SmtpConnections, Turn
from services.sender.mime import BuiltMail, MimeError, build
from services.sender.publisher import Publisher, StatusReporter
from services.sender.rate_limit import RateLimiter
from services.sender.resolver import NoRoute, Resolver, Route, UnreadablePassword
from shared import metrics
from shared.contracts.send import InvalidCommand, SendCommand, SendResult
from shared.contracts.status_reports import FailureCategory
from shared.db import send_requests as repo
from shared.db.pool import DictConnection, session_options
from shared.email_servers import AuthType, EmailServer
from shared.login_secrets import LoginSecrets
from shared.mail.connector import Connector
from shared.mail.errors import MailServerError
from shared.mail.smtp import SmtpError
from shared.oauth.tokens import OAuthTokens
from shared.secrets import SecretBox
from shared.server_directory import ServerDirectory
from shared.settings import Settings
from shared.topology import SENDER_DELIVERY_QUEUE_NAME

log = logging.getLogger(__name__)

ACTOR_NAME = "mailroom_sender_deliver"
# A dramatiq message's unexpected failures, [strikes, the first one's time]: its options go
# with it when dramatiq enqueues it again.
STRIKES_OPTION = "mailroom_strikes"
BUSY_RETRY_MILLISECONDS = 1000
RETRY_SWEEP_SECONDS = 60.0  # how often overdue retries are looked for (``send_retries``)
RETRY_SWEEP_GRACE_SECONDS = 300.0  # ... and how late one must be (at least the longest backoff)
# A command on which the sender failed unexpectedly this often is quarantined: it would
# otherwise come again forever, and fail the commands delivered with it each time.
POISON_STRIKES = 3
POISON_MIN_SECONDS = 10.0  # ... over at least this long: time for others to fail alike
# Unless it is not the only one: then the fault may be the sender's (a bug, a setting), and
# failing every mail for good would turn a fixable outage into lost mail. They wait (and, as
# the commands after a failed one go on at once, they hold nothing up).
WIDESPREAD_SECONDS = 60.0  # another request struck within this long (the intake's window; a
# request's strikes are forgotten after it, too). A retry's window is wider: retries of the
# same fault may be up to the longest backoff apart (``Sender._retry_window``).
POISON_REASON = (
    "the sender failed on this command {strikes} times ({error}); it is not tried again and is"
    " kept in the dead-letter queue"
)
# Errors that say a service is away, not that a command is bad: they never count against one.
INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    OSError,
    amqp.exceptions.AMQPError,
    amqp.exceptions.MessageNacked,
    kombu.exceptions.KombuError,
    dramatiq.errors.BrokerConnectionError,
)


def _blameable(exc: BaseException) -> bool:
    """Whether an unexpected error may be the command's doing. PostgreSQL's "program limit"
    errors (class 54, e.g. a batch whose JSON is too large) are ``OperationalError``s too,
    but they come from the data."""
    return isinstance(exc, psycopg.errors.ProgramLimitExceeded) or not isinstance(
        exc, INFRASTRUCTURE_ERRORS
    )


UNCERTAIN_REASON = (
    "delivery outcome unknown: the mail was handed to the SMTP server ({detail}) but its answer "
    "was not recorded; it is not sent again, so it arrived once or not at all"
)


def _release_locks(conn: DictConnection) -> None:
    """After a failure: every request lock of the session released now, then the connection
    closed. Closing alone releases them too, but only once PostgreSQL has noticed, while the
    same requests may be asked for again at once (a batch tried command by command)."""
    try:
        if not conn.closed and conn.pgconn.transaction_status == pq.TransactionStatus.IDLE:
            conn.execute("SELECT pg_advisory_unlock_all()")
    except psycopg.Error:
        pass  # the connection is broken or busy: closing it is all there is
    finally:
        conn.close()


def _shifted(
    done: Done, offset: int, index: int, outcome: Outcome, results: list[SendResult]
) -> None:
    """``done`` of a batch, told by a part of it that starts at ``offset``."""
    done(offset + index, outcome, results)


def _milliseconds(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def make_broker(settings: Settings) -> RabbitmqBroker:
    return RabbitmqBroker(
        url=settings.amqp_url,
        confirm_delivery=True,
        middleware=[
            # Every failure is retried (no limit on the count: the deadline is the delivery's,
            # and a command that keeps failing is closed by :meth:`Sender._retry_struck`).
            Retries(
                max_retries=None,
                min_backoff=_milliseconds(settings.sender_retry_min_backoff_seconds),
                max_backoff=_milliseconds(settings.sender_retry_max_backoff_seconds),
            ),
            CurrentMessage(),
        ],
    )


class Outcome(enum.Enum):
    """What becomes of a command after its first attempt (the consumer acts on it)."""

    ACK = "ack"
    REQUEUE = "requeue"  # not handled now (a failure, or busy elsewhere): deliver it again


@dataclass(frozen=True)
class FirstAttempt:
    """A validated command handed to :meth:`Sender.deliver_batch`."""

    command: SendCommand
    raw: dict[str, Any]
    redelivered: bool  # AMQP's flag: ours, back after a crash or a requeue (module doc)


# Told when a command's first attempt is over: its index in the batch, what becomes of the
# command, and the results to publish before it is acked.
Done = Callable[[int, Outcome, list[SendResult]], None]
_Completion = tuple[int, Outcome, list[SendResult]]


class _Lane:
    """A delivery thread's database connection, and the accepted mail whose ``sent`` waits
    to ride along with the thread's next statement (:class:`repo.Sent`).

    Recording ``sent`` on its own would cost every mail a second commit. Instead it goes with
    the next mail's "DATA starts" mark, or alone (:meth:`flush`) before anything else touches
    the connection or may block: a batch's end, a wait for a connection slot, a new SMTP
    connection, the rate limit, a token request. The mail's command is acked, and its result
    published, only once its ``sent`` is committed (``waiting``).

    The accepted mail's result, metrics and status report are made later as well
    (:meth:`report_later`): while the server answers the next mail's MAIL FROM, not between the
    server's 250 and that MAIL FROM, where they took about 45 us of every mail's cycle.
    """

    def __init__(
        self, conn: DictConnection, done: Done | None = None, turn: Turn | None = None
    ) -> None:
        self.conn = conn
        self.done = done  # first attempts only defer; a dramatiq retry records at once
        self.turn = turn  # the SMTP connection kept from one mail of the batch to the next
        # Work for the time the server takes to decide on a mail (building the next one): done
        # by the thread that waits anyway, not by another thread competing with it for the GIL.
        self.spare_time: Callable[[], None] | None = None
        self._deferred: repo.Sent | None = None
        self._in_flight: repo.Sent | None = None  # sent along with a statement on its way
        self._waiting: _Completion | None = None  # the deferred mail's ``done`` arguments
        self._report: Callable[[], None] | None = None  # the deferred mail's result and reports

    @property
    def has_deferred(self) -> bool:
        return self._deferred is not None

    def defer(self, sent: repo.Sent) -> None:
        self.flush()
        self._deferred = sent

    def report_later(self, report: Callable[[], None]) -> None:
        """For the deferred mail: made by :meth:`report_now`, at the latest when it is
        recorded (its results are complete before its command is)."""
        self._report = report

    def report_now(self) -> None:
        """Runs where an SMTP exchange is under way (after MAIL FROM), so it never raises: a
        report that fails leaves the mail's command to come again, acked only once its result
        was published again from its row (``_seen_before``), never acked without one."""
        report, self._report = self._report, None
        if report is None:
            return
        try:
            report()
        except Exception:
            log.exception("sender: an accepted mail's result could not be made; it comes again")
            if self._waiting is not None:
                self._waiting = (self._waiting[0], Outcome.REQUEUE, [])

    def complete_when_recorded(self, completion: _Completion) -> None:
        assert self._deferred is not None
        self._waiting = completion

    def take(self) -> repo.Sent | None:
        """The deferred ``sent`` for a statement about to go; :meth:`recorded` once it did.
        With none deferred, one still on its way (a mark sent before its connection was
        replaced) stays in flight."""
        sent, self._deferred = self._deferred, None
        if sent is not None:
            self._in_flight = sent
        return sent

    def recorded(self) -> None:
        self.report_now()
        if self._in_flight is None:
            return
        self._in_flight = None
        completion, self._waiting = self._waiting, None
        if completion is not None and self.done is not None:
            self.done(*completion)

    def before_wait(self) -> None:
        """Before something that may take a while: give the connection back, record."""
        if self.turn is not None:
            self.turn.release()
        self.flush()

    def flush(self) -> None:
        """Record the deferred ``sent`` now, on its own."""
        sent = self.take()
        if sent is not None:
            repo.finish_sent(self.conn, sent)
            self.recorded()

    def unrecorded(self) -> tuple[repo.Sent | None, _Completion | None, bool]:
        """After a failure: the accepted mail not known to be recorded, its completion, and
        whether its ``sent`` was on its way with the statement that failed."""
        self.report_now()
        in_flight = self._in_flight is not None
        sent = self._in_flight or self._deferred
        self._in_flight = self._deferred = None
        completion, self._waiting = self._waiting, None
        return sent, completion, in_flight


class _Mark:
    """An attempt's "DATA starts" mark, as its SMTP transaction's
    :class:`~shared.mail.smtp.Handover`: sent once MAIL FROM is written, with the thread's
    previous mail's ``sent`` riding along, and committed before the mail's final ``.``."""

    def __init__(self, work: _Work, route: Route, mail: BuiltMail) -> None:
        self._work, self._route, self._mail = work, route, mail
        self._statement: repo.PendingStatement | None = None
        self.handed_over = False  # the final ``.`` may have gone out

    def start(self) -> None:
        if self._statement is None:  # a replaced stale connection asks again: once is enough
            row, lane = self._work.request, self._work.lane
            self._statement = repo.begin_mark_data_started(
                lane.conn,
                row.tenant_id,
                row.request_id,
                self._route.server_id,
                self._mail.message_id,
                sent=lane.take(),
            )
            lane.report_now()  # the previous mail's, while the server answers MAIL FROM

    def ready(self) -> bool:
        return self._statement is not None and self._statement.ready()

    def wait(self) -> None:
        self.start()
        assert self._statement is not None
        self._statement.wait()
        self.handed_over = True

    def deciding(self) -> None:
        """While the server decides: the previous mail's completion (its result goes to the
        publishing thread's queue) and the thread's spare work
        (:attr:`_Lane.spare_time`). Done here rather than between DATA's 354 and the mail,
        where the woken thread competed for the GIL with the one about to write the mail."""
        self._work.lane.recorded()
        spare, self._work.lane.spare_time = self._work.lane.spare_time, None
        if spare is not None:
            try:
                spare()
            except Exception:  # never the mail's outcome: its reply comes next
                log.exception("sender: preparing the next mail failed; it is prepared in its turn")

    def committed(self) -> None:
        """Until the mark (and the previous mail's ``sent``) is committed, if it was sent:
        the thread's connection is free for its next statement then."""
        if self._statement is not None:
            self._statement.wait()
            self._work.lane.recorded()


@dataclass(frozen=True)
class _BuiltAhead:
    """A mail built before its turn on the SMTP connection, for the route it had then, so
    that a thread holding the connection between two mails only talks to the servers
    (building one cost about 0.35 ms of that gap). A batch's first mail is built before the
    thread takes the connection, each other one while the server decides on the mail before
    it (:attr:`_Lane.spare_time`): built all at once by a thread waiting for its turn, they
    held the GIL in bursts of milliseconds while another thread's SMTP replies came in. Its
    turn resolves again and builds anew if the route changed meanwhile (an admin's edit)."""

    route: Route
    mail: BuiltMail


@dataclass
class _Work:
    """One request in the hands of one thread, which holds the request's advisory lock."""

    lane: _Lane
    tenant_id: str
    request_id: str
    row: repo.SendRequest | None
    # The command as it came, when the intake makes the attempt (its row keeps none); None
    # for dramatiq's retries, which read it from the row.
    in_hand: dict[str, Any] | None
    locked: bool = True
    results: list[SendResult] = field(default_factory=list)  # inline: published by the intake

    @property
    def inline(self) -> bool:
        """The intake's attempt (a retry is handed to dramatiq)."""
        return self.in_hand is not None

    @property
    def conn(self) -> DictConnection:
        """The thread's connection, after its deferred ``sent`` (statements stay in order)."""
        self.lane.flush()
        return self.lane.conn

    @property
    def request(self) -> repo.SendRequest:
        assert self.row is not None
        return self.row

    @property
    def command(self) -> dict[str, Any] | None:
        """The command as it came: in hand for a first attempt, else kept by its row (from
        the first retry on; None only in a row that lost it)."""
        return self.in_hand if self.in_hand is not None else self.request.command


class Sender:
    """Everything between a validated command and its result; shared by all threads."""

    def __init__(self, settings: Settings, directory: ServerDirectory) -> None:
        self.settings = settings
        self.directory = directory
        # Autocommit: every state change is durable when its statement returns (module doc).
        self.db: ConnectionPool[DictConnection] = ConnectionPool(
            settings.database_url,
            min_size=1,
            max_size=settings.sender_threads + settings.sender_retry_threads + 2,
            connection_class=cast(type[DictConnection], psycopg.Connection),
            kwargs={
                "row_factory": dict_row,
                "autocommit": True,
                "application_name": "mailroom-sender",
                # The marks are prepared statements of our own (repo.PendingStatement); psycopg's
                # automatic ones would make it drop every prepared statement after a rollback.
                "prepare_threshold": None,
                **session_options(settings.database_url),
            },
            open=False,
            name="mailroom-sender",
        )
        self.db.open(wait=True, timeout=10)
        self.publisher = Publisher(settings.amqp_url)
        self.reporter = StatusReporter(self.publisher, settings.sender_status_report_seconds)
        self.connections = SmtpConnections(
            per_server=settings.sender_connections_per_server,
            idle_seconds=settings.sender_idle_close_seconds,
            connector=Connector.from_settings(settings, settings.sender_smtp_timeout_seconds),
        )
        self.limiter = RateLimiter(
            settings.redis_url, settings.sender_rate_per_minute, settings.sender_rate_burst
        )
        secret_box = SecretBox.from_settings(settings)
        self.resolver = Resolver(settings, directory, self.db, secret_box)
        self.login_secrets = LoginSecrets(
            secret_box, OAuthTokens.from_settings(settings, self.db, secret_box)
        )
        self.broker = make_broker(settings)
        self.actor: dramatiq.Actor[Any, Any] = dramatiq.Actor(
            self._deliver_message,
            broker=self.broker,
            actor_name=ACTOR_NAME,
            queue_name=SENDER_DELIVERY_QUEUE_NAME,
            priority=0,
            options={},
        )
        self.stopping = threading.Event()
        self._known_tenants: set[str] = set()
        # Unexpected failures per request within the window: how many, the first one's and the
        # last one's time; the request struck least recently first.
        self._strikes: OrderedDict[tuple[str, str], tuple[int, float, float]] = OrderedDict()
        self._widespread_told_at = -WIDESPREAD_SECONDS
        self._retry_window = max(WIDESPREAD_SECONDS, 2 * settings.sender_retry_max_backoff_seconds)
        # A retry this late is taken for lost: dramatiq may be late itself (busy, restarted).
        self._retry_grace = max(
            RETRY_SWEEP_GRACE_SECONDS, settings.sender_retry_max_backoff_seconds
        )
        self._swept_at = time.monotonic()
        self._strikes_lock = threading.Lock()
        self._worker: dramatiq.Worker | None = None

    # --- running ---------------------------------------------------------------------------

    def start_worker(self) -> None:
        if self._worker is None:
            threads = self.settings.sender_retry_threads
            self._worker = dramatiq.Worker(self.broker, worker_threads=threads)
            self._worker.start()
            log.info("sender: %d retry threads (dramatiq) started", threads)

    def tick(self) -> None:
        self.connections.close_idle()
        self.reporter.flush_due()
        now = time.monotonic()
        if now - self._swept_at >= RETRY_SWEEP_SECONDS:
            self._swept_at = now
            try:
                self.sweep_overdue_retries()
            except psycopg.Error as exc:
                log.warning("sender: overdue retries not checked now (%s)", exc)

    def sweep_overdue_retries(self, overdue_seconds: float | None = None) -> int:
        """Requests whose retry is long overdue (``send_retries``): their dramatiq message was
        lost, or is late. A new message takes each over (a late one then finds it owned by
        another and ends); what waits no more is forgotten. How many were taken over."""
        grace = self._retry_grace if overdue_seconds is None else overdue_seconds
        with self.db.connection() as conn:
            due = repo.overdue_retries(conn, grace)
        taken = 0
        for tenant_id, request_id in due:
            with self.db.connection() as conn:
                try:
                    taken += self._take_over_overdue(conn, tenant_id, request_id)
                except BaseException:
                    _release_locks(conn)  # a session lock must not stay with a pooled one
                    raise
        return taken

    def _take_over_overdue(self, conn: DictConnection, tenant_id: str, request_id: str) -> int:
        locked, row = repo.lock_and_get(conn, tenant_id, request_id)
        if not locked:
            return 0  # at work right now
        with self._holding(_Lane(conn), tenant_id, request_id, row, None) as work:
            if row is None or row.state in ("sent", "failed"):
                repo.retry_done(conn, tenant_id, request_id)
                return 0
            if row.state != "retry_wait":
                # An attempt cut short: its message comes again (unacked). Looked at again
                # later, behind the others (the oldest come first, a hundred at a time).
                repo.retry_due(conn, tenant_id, request_id, self._retry_grace)
                return 0
            self._reschedule(work)
        log.warning(
            "sender: request %s of %s waited for a retry that did not come; scheduled again",
            request_id,
            tenant_id,
        )
        return 1

    def close(self) -> None:
        self.stopping.set()
        if self._worker is not None:
            self._worker.stop(timeout=30_000)
            self._worker = None
        self.broker.close()
        self.connections.close()
        self.publisher.close()
        self.db.close()

    def on_server_change(self, before: EmailServer | None, after: EmailServer | None) -> None:
        if before is not None:
            self.connections.forget(before.id)

    # --- the consumer's side ---------------------------------------------------------------

    def tenant_known(self, tenant_id: str) -> bool:
        if tenant_id in self._known_tenants:
            return True
        known = any(s.tenant_id == tenant_id for s in self.directory.all())
        if not known:
            with self.db.connection() as conn:
                known = repo.tenant_known(conn, tenant_id)
        if known:
            self._known_tenants.add(tenant_id)
        return known

    def reject_invalid(self, body: bytes, content_type: str | None, error: InvalidCommand) -> None:
        """An invalid command: kept in the dead-letter queue and answered ``failed``."""
        log.warning("sender: invalid send command (request %s): %s", error.request_id, error.reason)
        self.publisher.result(
            self._kept_unrecorded(
                body,
                error.reason,
                error.request_id,
                error.tenant_id,
                category="invalid_command",
                content_type=content_type,
            )
        )

    def _kept_unrecorded(
        self,
        body: bytes,
        reason: str,
        request_id: str | None,
        tenant_id: str | None,
        *,
        category: str,
        content_type: str | None = "application/json",
    ) -> SendResult:
        """A command without a row: its body goes to the dead-letter queue; its final result."""
        self.publisher.dead_letter(
            body,
            reason=reason,
            request_id=request_id,
            tenant_id=tenant_id,
            content_type=content_type,
        )
        return SendResult(
            request_id=request_id,
            tenant_id=tenant_id,
            status="failed",
            final=True,
            reason=reason,
            category=category,
        )

    # --- first attempts (intake threads) ---------------------------------------------------

    def deliver_batch(self, attempts: list[FirstAttempt], done: Done) -> None:
        """First attempts of validated commands (distinct requests), in order, on one
        database connection: one statement records them all, then each mail costs one more.

        ``done`` is called once per command, in order. After an unexpected error (the
        database or a bug) the commands not handled yet are requeued, never dropped. An error
        that is not the database's or the broker's absence may be one command's doing, which
        would fail its neighbours on every redelivery too: if it failed the statement that
        records them all, each is tried again on its own; if it failed one command's attempt,
        that command is requeued (quarantined once it did so ``POISON_STRIKES`` times,
        :meth:`_struck`) and the ones after it go on at once.
        """
        failure = self._deliver_batch(attempts, done)
        if failure is None:
            return
        handled, recorded, exc, sent_in_flight = failure
        # A failure while an accepted mail's ``sent`` was on its way may be that statement's:
        # not held against the command whose statement carried it.
        blameable = _blameable(exc) and not sent_in_flight
        if blameable and not recorded and len(attempts) > 1:
            log.warning(
                "sender: recording %d commands together failed (%s); each is tried on its own",
                len(attempts),
                type(exc).__name__,
            )
            for index, attempt in enumerate(attempts):
                # As if requeued: one that finds its request recorded or locked after all is
                # healed or waits (``redelivered``), never dropped as a copy.
                self.deliver_batch(
                    [replace(attempt, redelivered=True)], partial(_shifted, done, index)
                )
            return
        if not blameable or handled >= len(attempts):
            for index in range(handled, len(attempts)):
                done(index, Outcome.REQUEUE, [])
            return
        results = self._struck(attempts[handled], exc)
        done(handled, Outcome.REQUEUE if results is None else Outcome.ACK, results or [])
        rest = [replace(attempt, redelivered=True) for attempt in attempts[handled + 1 :]]
        if rest:  # as if requeued (their requests are recorded), without waiting behind it
            self.deliver_batch(rest, partial(_shifted, done, handled + 1))

    def _deliver_batch(
        self, attempts: list[FirstAttempt], done: Done
    ) -> tuple[int, bool, Exception, bool] | None:
        """The batch; after an unexpected error, how many went to ``done``, whether the batch
        was recorded, the error, and whether an accepted mail's ``sent`` was on its way with
        the statement that failed."""
        handled = 0  # attempts[:handled] went to ``done``, or wait for their ``sent``
        recorded = False
        with self.db.connection() as conn:
            lane = _Lane(conn, done, self.connections.turn())
            try:
                started = repo.start_first_attempts(
                    conn,
                    [
                        repo.NewRequest(
                            a.command.tenant_id,
                            a.command.request_id,
                            self.settings.sender_retry_deadline_seconds,
                        )
                        for a in attempts
                    ],
                )
                recorded = True
                ahead: dict[int, _BuiltAhead | None] = {}

                def build_ahead(index: int) -> None:
                    ahead[index] = self._build_ahead(attempts[index], started[index])

                build_ahead(0)
                for index, (attempt, start) in enumerate(zip(attempts, started, strict=True)):
                    last = index + 1 == len(attempts)
                    lane.spare_time = None if last else partial(build_ahead, index + 1)
                    built = ahead.pop(index, None)
                    outcome, results = self._first_attempt(lane, attempt, start, built)
                    handled = index + 1
                    if lane.has_deferred:
                        lane.complete_when_recorded((index, outcome, results))
                    else:
                        done(index, outcome, results)
                lane.before_wait()
            except Exception as exc:
                log.exception(
                    "sender: could not deliver %d commands now; they are requeued",
                    len(attempts) - handled,
                )
                # The accepted mail's ``sent`` first: its request stays locked meanwhile.
                sent_in_flight = self._record_after_failure(lane, done)
                _release_locks(conn)
                return handled, recorded, exc, sent_in_flight
            finally:
                if lane.turn is not None:
                    lane.turn.release()
        return None

    def _struck(self, attempt: FirstAttempt, exc: Exception) -> list[SendResult] | None:
        """One more unexpected failure on this command: ``None`` (it comes again), or, once
        :meth:`_strike` says so, its results as a quarantined command (failed, final, in the
        dead-letter queue). Counted in this process: a restart forgives, and N processes try
        up to N times as often."""
        command = attempt.command
        strikes, _, poisoned = self._strike((command.tenant_id, command.request_id))
        if not poisoned:
            return None
        reason = POISON_REASON.format(strikes=strikes, error=f"{type(exc).__name__}: {exc}")
        try:
            return self._close_for_good(
                command.tenant_id, command.request_id, reason, in_hand=attempt.raw
            )
        except Exception:
            log.exception("sender: request %s could not be quarantined now", command.request_id)
            return None

    def _strike(
        self,
        key: tuple[str, str],
        kept: tuple[int, float] | None = None,
        window: float = WIDESPREAD_SECONDS,
    ) -> tuple[int, float, bool]:
        """One more unexpected failure of a request: its strikes, the first one's time, and
        whether it is to be quarantined now (``POISON_STRIKES`` over ``POISON_MIN_SECONDS``).
        While another request failed so within ``window`` none is, and a request is counted
        again from when it is the only one. ``kept``: the strikes as the caller keeps them (a
        dramatiq message's); else as this process counted them."""
        now = time.time()  # wall-clock time: a retry's strikes may be counted by another host
        with self._strikes_lock:
            recent = self._strikes
            counted = recent.pop(key, None)
            while recent and now - next(iter(recent.values()))[2] > self._retry_window:
                recent.popitem(last=False)
            if kept is not None:
                strikes, first = kept
            elif counted is not None and now - counted[2] <= WIDESPREAD_SECONDS:
                strikes, first = counted[0], counted[1]
            else:
                strikes, first = 0, now
            # Ordered by the last strike: the newest other one tells whether it is alone.
            newest_other = next(reversed(recent.values()), None)
            widespread = newest_other is not None and now - newest_other[2] <= window
            tell = widespread and now - self._widespread_told_at > WIDESPREAD_SECONDS
            if tell:
                self._widespread_told_at = now
                struck = 1 + sum(1 for *_, last in recent.values() if now - last <= window)
            strikes, first = (0, now) if widespread else (strikes + 1, first)
            recent[key] = (strikes, first, now)
        if tell:
            log.error(
                "sender: unexpected failures on %d commands within %.0f s: none is quarantined,"
                " they wait for the fault to be fixed",
                struck,
                window,
            )
        return strikes, first, strikes >= POISON_STRIKES and now - first >= POISON_MIN_SECONDS

    def _close_for_good(
        self,
        tenant_id: str,
        request_id: str,
        reason: str,
        *,
        in_hand: dict[str, Any] | None = None,
        owner: str | None = None,
    ) -> list[SendResult] | None:
        """Close a request the sender keeps failing on as ``failed`` (as uncertain, if its
        mail may have been handed over), or publish its final result again if it has one;
        ``None`` if another thread holds it. ``in_hand``: the intake's command, whose results
        are returned (published with its ack); ``owner``: a dramatiq message, which closes only
        a request it still owns and publishes at once."""
        with self.db.connection() as conn:
            try:
                locked, row = repo.lock_and_get(conn, tenant_id, request_id)
                if not locked:
                    return None
                with self._holding(_Lane(conn), tenant_id, request_id, row, in_hand) as work:
                    if row is None:  # never recorded: what the command is, is kept
                        if in_hand is not None:
                            self._fail_unrecorded(work, reason)
                    elif owner is not None and row.owner_message_id != owner:
                        pass  # a newer message owns it: this copy ends
                    elif row.state in ("sent", "failed"):
                        self._publish_final_again(work)
                    elif row.state == "sending" and row.data_started_at is not None:
                        self._close_uncertain(work, reason)
                    else:
                        self._fail(work, None, reason, category="internal_error")
            except BaseException:
                _release_locks(conn)  # a session lock must not stay with a pooled connection
                raise
        return work.results

    def _fail_unrecorded(self, work: _Work, reason: str) -> None:
        """:meth:`_fail` for a request without a row: the command in hand is what is kept."""
        work.results.append(
            self._kept_unrecorded(
                json.dumps(work.command).encode(),
                reason,
                work.request_id,
                work.tenant_id,
                category="internal_error",
            )
        )
        log.warning("sender: request %s failed: %s", work.request_id, reason)

    def _record_after_failure(self, lane: _Lane, done: Done) -> bool:
        """A mail the server accepted whose ``sent`` may not be recorded: try on a fresh
        connection; if that fails too its command comes again and is closed as uncertain.
        Whether its ``sent`` was on its way with the statement that failed."""
        sent, completion, in_flight = lane.unrecorded()
        if sent is None or completion is None:
            return False
        try:
            with self.db.connection() as conn:
                repo.finish_sent(conn, sent, unlock=False)  # the lock went with the old one
        except Exception:
            log.exception("sender: request %s was accepted but not recorded", sent.request_id)
            done(completion[0], Outcome.REQUEUE, [])
            return in_flight
        done(*completion)
        return in_flight

    def _build_ahead(self, attempt: FirstAttempt, start: repo.Started) -> _BuiltAhead | None:
        """For a new request; ``None`` leaves everything to its turn (where a missing route,
        a mail that cannot be built or an unexpected error is handled as it always is)."""
        if not start.locked or start.row is None:
            return None
        try:
            route = self.resolver.resolve(attempt.command)
            return _BuiltAhead(route, self._build(attempt.command, route))
        except Exception:  # noqa: BLE001 - met again, and handled, in its turn
            return None

    def _first_attempt(
        self,
        lane: _Lane,
        attempt: FirstAttempt,
        start: repo.Started,
        ahead: _BuiltAhead | None = None,
    ) -> tuple[Outcome, list[SendResult]]:
        command = attempt.command
        tenant_id, request_id = command.tenant_id, command.request_id
        if not start.locked:
            if attempt.redelivered:  # maybe our own earlier copy, still at work: later
                return Outcome.REQUEUE, []
            log.info("sender: request %s is being delivered already; copy dropped", request_id)
            return Outcome.ACK, []
        with self._holding(lane, tenant_id, request_id, start.row, attempt.raw) as work:
            if start.row is not None:
                self._resolve_and_attempt(work, command, ahead)
            else:
                work.row = repo.get_locked(work.conn, tenant_id, request_id)
                self._seen_before(work, command, redelivered=attempt.redelivered)
        return Outcome.ACK, work.results

    def _seen_before(self, work: _Work, command: SendCommand, *, redelivered: bool) -> None:
        row = work.row
        if row is None:  # removed meanwhile (only an operator does that): nothing to do
            log.warning("sender: request %s vanished while it was read", work.request_id)
            return
        if not redelivered:
            log.info(
                "sender: request %s of %s seen before (%s); not sent again",
                row.request_id,
                row.tenant_id,
                row.state,
            )
            return
        if row.state in ("sent", "failed"):
            self._publish_final_again(work)
        elif row.state == "sending" and row.data_started_at is not None:
            self._close_uncertain(work, "the sender stopped before recording its answer")
        elif row.state == "retry_wait":
            self._reschedule(work)  # its retry may never have been enqueued
        else:  # received, or sending without DATA: nothing was handed over, try now
            work.row = repo.claim(work.conn, row.tenant_id, row.request_id, repo.INTAKE_OWNER)
            self._resolve_and_attempt(work, command)

    # --- retries (dramatiq threads) --------------------------------------------------------

    def _deliver_message(self, tenant_id: str, request_id: str) -> None:
        current = CurrentMessage.get_current_message()
        owner = current.message_id if current is not None else ""
        try:
            self.deliver(tenant_id, request_id, owner)
        except dramatiq.Retry:
            raise
        except Exception as exc:
            # A service away is retried until it is back; what may be the command's doing is
            # retried until it is struck out.
            if current is None or not _blameable(exc):
                raise
            if not self._retry_struck(current, tenant_id, request_id, exc):
                raise

    def _retry_struck(
        self, message: dramatiq.Message[Any], tenant_id: str, request_id: str, exc: Exception
    ) -> bool:
        """Counts an unexpected failure of a retry in its message (strikes in a row: an
        attempt that gets as far as the server's answer clears them); whether it ended the
        request (closed for good, or owned by a newer message)."""
        kept = message.options.get(STRIKES_OPTION)
        strikes, first, poisoned = self._strike(
            (tenant_id, request_id),
            (int(kept[0]), float(kept[1])) if kept else (0, time.time()),
            window=self._retry_window,
        )
        message.options[STRIKES_OPTION] = [strikes, first]
        if not poisoned:
            return False
        reason = POISON_REASON.format(strikes=strikes, error=f"{type(exc).__name__}: {exc}")
        try:
            closed = self._close_for_good(tenant_id, request_id, reason, owner=message.message_id)
        except Exception:
            log.exception("sender: request %s could not be closed now; retried", request_id)
            return False
        return closed is not None

    def deliver(self, tenant_id: str, request_id: str, owner: str) -> None:
        with self.db.connection() as conn:
            locked, row = repo.lock_and_get(conn, tenant_id, request_id)
            if not locked:
                log.info("sender: request %s is being delivered by another thread", request_id)
                raise dramatiq.Retry("busy", delay=BUSY_RETRY_MILLISECONDS)
            with self._holding(_Lane(conn), tenant_id, request_id, row, None) as work:
                self._deliver_locked(work, owner)

    def _deliver_locked(self, work: _Work, owner: str) -> None:
        row = work.row
        if row is None:
            log.warning("sender: a delivery for an unknown request; ignored")
            return
        if row.owner_message_id != owner:
            log.debug("sender: request %s has a newer message; this copy ends", row.request_id)
            return
        if row.state in ("sent", "failed"):
            self._publish_final_again(work)
            return
        if row.state == "sending" and row.data_started_at is not None:
            self._close_uncertain(work, "the sender stopped before recording its answer")
            return
        if row.command is None:  # only a row changed by hand; nothing to send
            self._fail(
                work, None, "the command was not kept for its retry", category="internal_error"
            )
            return
        command = SendCommand.model_validate(row.command)
        work.row = repo.claim(work.conn, row.tenant_id, row.request_id)
        self._resolve_and_attempt(work, command)

    # --- one attempt -----------------------------------------------------------------------

    @contextmanager
    def _holding(
        self,
        lane: _Lane,
        tenant_id: str,
        request_id: str,
        row: repo.SendRequest | None,
        in_hand: dict[str, Any] | None,
    ) -> Iterator[_Work]:
        """The request's lock is held on entry; released on exit unless a finish did it.
        ``in_hand``: the intake's command (None: dramatiq's retry)."""
        work = _Work(lane, tenant_id, request_id, row, in_hand)
        try:
            yield work
        finally:
            if work.locked and not lane.conn.closed:
                repo.unlock(work.conn, tenant_id, request_id)

    @staticmethod
    def _build(command: SendCommand, route: Route) -> BuiltMail:
        return build(command, route.from_mailbox, allow_smtputf8=True)

    def _resolve_and_attempt(
        self, work: _Work, command: SendCommand, ahead: _BuiltAhead | None = None
    ) -> None:
        try:
            route = self.resolver.resolve(command)
        except NoRoute as exc:
            self._fail(work, None, exc.reason, category="no_route")
            return
        except UnreadablePassword as exc:
            self._login_unavailable(work, Route(exc.server, "", None), exc.error)
            return
        try:
            mail = ahead.mail if ahead and ahead.route == route else self._build(command, route)
        except MimeError as exc:
            self._fail(work, route, str(exc), category="invalid_command")
            return
        if route.server.auth_type is AuthType.OAUTH2:
            # A fresh access token per attempt; pooled connections stay logged in with theirs.
            work.lane.before_wait()  # asking the provider may take a while
            try:
                route = replace(route, password=self.login_secrets.for_server(route.server))
            except MailServerError as exc:
                self._login_unavailable(work, route, exc)
                return
        if self.limiter.enabled:
            work.lane.before_wait()  # the limit may make it wait
            self.limiter.wait(route.server.id, self.stopping)
        self._attempt(work, route, mail)

    def _login_unavailable(self, work: _Work, route: Route, error: MailServerError) -> None:
        """No secret to log in with (consent missing, the provider away, a password no key
        opens): retried until the deadline, so mail waits for the admin instead of failing at
        once, and the server is reported failing."""
        temporary = SmtpError(error.category, error.reason, temporary=True)
        self._smtp_failed(work, route, temporary, handed_over=False)

    def _attempt(self, work: _Work, route: Route, mail: BuiltMail) -> None:
        mark = _Mark(work, route, mail)
        started = time.monotonic()
        try:
            code, text = self.connections.send(
                route.server,
                route.password,
                mail.envelope_from,
                mail.recipients,
                mail.data,
                handover=mark,
                before_wait=work.lane.before_wait,
                smtputf8=mail.smtputf8,
                turn=work.lane.turn,
            )
        except SmtpError as exc:
            mark.committed()  # the connection is free for the next statement
            self._smtp_failed(work, route, exc, handed_over=mark.handed_over)
            return
        finally:
            if not mark.handed_over:
                mark.committed()
        seconds = time.monotonic() - started
        sent: dict[str, Any] = {
            "server_id": route.server_id,
            "smtp_code": code,
            "smtp_response": text,
        }
        try:
            self._finish(work, state="sent", **sent)
        except psycopg.Error:
            if work.inline:
                raise  # the intake's way: :meth:`_record_after_failure`
            self._record_sent_again(work, sent)
        report = partial(self._report_sent, work, route, mail, code, text, seconds)
        if work.lane.has_deferred:
            work.lane.report_later(report)  # :class:`_Lane`: after the next MAIL FROM
        else:
            report()

    def _record_sent_again(self, work: _Work, sent: dict[str, Any]) -> None:
        """A retry's accepted mail whose ``sent`` failed to be recorded (its connection broke,
        say): once more on a fresh connection, else it would be closed as uncertain when the
        retry comes again, and a client told "failed" for a mail that arrived. Its lock went
        with the broken connection, or is released on the way out (:meth:`_holding`)."""
        log.warning("sender: request %s was accepted; recording it again", work.request_id)
        with self.db.connection() as conn:
            repo.finish(conn, work.tenant_id, work.request_id, state="sent", **sent)

    def _report_sent(
        self, work: _Work, route: Route, mail: BuiltMail, code: int, text: str, seconds: float
    ) -> None:
        """An accepted mail's result, metrics and status report. It must not use the
        thread's database connection (a statement may be on its way there)."""
        row = work.request
        metrics.SEND_SECONDS.observe(seconds)
        self.reporter.record(route.server, ok=True, sent=True)
        self._emit(
            work,
            SendResult(
                request_id=row.request_id,
                tenant_id=row.tenant_id,
                status="sent",
                email_server_id=route.server_id,
                smtp_code=code,
                smtp_response=text,
                attempts=row.attempts,
                final=True,
                message_id=mail.message_id,
                from_address=mail.envelope_from,
                via_system_default=route.system_default,
            ),
        )
        log.debug(
            "sender: request %s sent via %s (attempt %d)",
            row.request_id,
            route.server_id or "the system default server",
            row.attempts,
        )

    def _finish(self, work: _Work, *, state: str, **fields: Any) -> None:
        """Record the attempt's outcome; releases the lock in the same round trip. A first
        attempt's ``sent`` rides along with the thread's next statement (:class:`_Lane`)."""
        if state == "sent" and work.lane.done is not None and work.locked:
            work.lane.defer(
                repo.Sent(
                    work.tenant_id,
                    work.request_id,
                    fields["server_id"],
                    fields["smtp_code"],
                    fields["smtp_response"],
                )
            )
        else:
            repo.finish(
                work.conn,
                work.tenant_id,
                work.request_id,
                state=state,
                unlock=work.locked,
                **fields,
            )
        work.locked = False

    def _smtp_failed(
        self,
        work: _Work,
        route: Route,
        exc: SmtpError,
        *,
        handed_over: bool,
    ) -> None:
        row = work.request
        work.lane.report_now()  # the previous mail's success is reported before this failure
        if route.server.auth_type is AuthType.OAUTH2 and exc.category is (
            FailureCategory.AUTHENTICATION
        ):
            # A refused token (revoked early?) is not the mail's fault: refresh, try again.
            self.login_secrets.login_refused(route.server)
            exc = SmtpError(
                exc.category, exc.reason, temporary=True, code=exc.code, response=exc.response
            )
        no_reply = exc.code is None or exc.code < 0
        server_fault = no_reply or exc.category is not FailureCategory.PROTOCOL
        self.reporter.record(
            route.server, ok=not server_fault, sent=False, reason=exc.reason, category=exc.category
        )
        if handed_over and no_reply:
            self._close_uncertain(work, exc.reason, route=route)
            return
        if exc.temporary and datetime.now(UTC) < row.deadline_at:
            self._retry_later(work, route, exc)
            return
        reason = f"{exc.reason} (retried until the deadline)" if exc.temporary else exc.reason
        self._fail(work, route, reason, error=exc)

    def _retry_later(self, work: _Work, route: Route, exc: SmtpError) -> None:
        """``retry_wait``, a result that says so, and the next attempt to dramatiq."""
        row = work.request
        fields: dict[str, Any] = {
            "server_id": route.server_id,
            "smtp_code": exc.code,
            "smtp_response": exc.response,
            "reason": exc.reason,
        }
        log.info("sender: request %s: %s; will retry", row.request_id, exc.reason)
        if not work.inline:
            # Retries picks the delay, at most the longest backoff.
            repo.retry_due(
                work.conn,
                work.tenant_id,
                work.request_id,
                self.settings.sender_retry_max_backoff_seconds,
            )
            self._finish(work, state="retry_wait", **fields)
            self._emit(work, self._result(row, route, exc.reason, exc, final=False))
            current = CurrentMessage.get_current_message()
            if current is not None:
                current.options.pop(STRIKES_OPTION, None)  # this attempt met no fault of ours
            raise dramatiq.Retry(exc.reason)  # Retries re-enqueues this message, with backoff
        message = self._retry_message(work)
        delay = self._first_backoff()
        repo.retry_due(work.conn, work.tenant_id, work.request_id, delay / 1000)
        self._finish(
            work,
            state="retry_wait",
            owner_message_id=message.message_id,
            command=work.command,  # its retry reads it from the row
            **fields,
        )
        self._emit(
            work,
            self._result(row, route, exc.reason, exc, final=False, next_attempt_in=delay / 1000),
        )
        self.broker.enqueue(message, delay=delay)

    def _reschedule(self, work: _Work) -> None:
        """A ``retry_wait`` request gets a new dramatiq message as its owner (an older one, if
        any comes, ends on the owner check) and its retry is due again."""
        message = self._retry_message(work)
        delay = self._first_backoff()
        repo.take_over(work.conn, work.tenant_id, work.request_id, message.message_id)
        repo.retry_due(work.conn, work.tenant_id, work.request_id, delay / 1000)
        self.broker.enqueue(message, delay=delay)

    def _retry_message(self, work: _Work) -> dramatiq.Message[Any]:
        # retries=1: dramatiq's backoff continues where the intake's first one left off.
        return self.actor.message_with_options(args=(work.tenant_id, work.request_id), retries=1)

    def _first_backoff(self) -> int:
        """Milliseconds before the first retry: dramatiq's backoff for retry 0, with jitter."""
        _, delay = compute_backoff(
            0,
            factor=_milliseconds(self.settings.sender_retry_min_backoff_seconds),
            max_backoff=_milliseconds(self.settings.sender_retry_max_backoff_seconds),
        )
        return int(delay)

    def _result(
        self,
        row: repo.SendRequest,
        route: Route | None,
        reason: str,
        exc: SmtpError | None,
        *,
        final: bool,
        uncertain: bool = False,
        category: str | None = None,
        next_attempt_in: float | None = None,
    ) -> SendResult:
        return SendResult(
            request_id=row.request_id,
            tenant_id=row.tenant_id,
            status="failed",
            email_server_id=route.server_id if route else None,
            smtp_code=exc.code if exc else None,
            smtp_response=exc.response if exc else None,
            attempts=row.attempts,
            final=final,
            reason=reason,
            category=category or (exc.category.value if exc else None),
            via_system_default=route.system_default if route else False,
            uncertain=uncertain,
            next_attempt_in_seconds=next_attempt_in,
        )

    def _fail(
        self,
        work: _Work,
        route: Route | None,
        reason: str,
        *,
        error: SmtpError | None = None,
        category: str | None = None,
        uncertain: bool = False,
    ) -> None:
        row = work.request
        self._finish(
            work,
            state="failed",
            server_id=route.server_id if route else None,
            smtp_code=error.code if error else None,
            smtp_response=error.response if error else None,
            reason=reason,
            uncertain=uncertain,
        )
        self.publisher.dead_letter(
            json.dumps(work.command).encode(),
            reason=reason,
            request_id=row.request_id,
            tenant_id=row.tenant_id,
            smtp_code=error.code if error else None,
            smtp_response=error.response if error else None,
            attempts=row.attempts,
        )
        self._emit(
            work,
            self._result(
                row, route, reason, error, final=True, uncertain=uncertain, category=category
            ),
        )
        log.warning("sender: request %s failed: %s", row.request_id, reason)

    def _close_uncertain(self, work: _Work, detail: str, route: Route | None = None) -> None:
        self._fail(
            work,
            route,
            UNCERTAIN_REASON.format(detail=detail),
            category="uncertain",
            uncertain=True,
        )

    def _emit(self, work: _Work, result: SendResult) -> None:
        """A first attempt's result goes out with its command's ack; a retry's at once."""
        if work.inline:
            work.results.append(result)
        else:
            self.publisher.result(result)

    def _publish_final_again(self, work: _Work) -> None:
        row = work.request
        self._emit(
            work,
            SendResult(
                request_id=row.request_id,
                tenant_id=row.tenant_id,
                status="sent" if row.state == "sent" else "failed",
                email_server_id=row.server_id
                if row.server_id and row.server_id != "system-default"
                else None,
                smtp_code=row.smtp_code,
                smtp_response=row.smtp_response,
                attempts=row.attempts,
                final=True,
                reason=row.reason,
                message_id=row.message_id,
                uncertain=row.uncertain,
            ),
        )
