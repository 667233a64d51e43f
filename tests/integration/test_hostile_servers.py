"""Every read from a mail server is bounded (issue 20, item 2), against the lab's hostile servers.

Each fake server of ``tests.lab.hostile_servers`` misbehaves in one way and is probed (the
connection test, directly and through the config API), fetched from (``ImapMailbox``,
``Pop3Mailbox``) and sent to (``open_session``, ``send_transaction``). Each test asserts:

- a reason an admin can read, naming the limit and where it was passed, in at most
  ``MAX_REASON`` characters;
- within the case's time: the connector's timeout (``TIMEOUT``) and a second for closing when
  a limit of bytes or time decides, one more second for a trickle (its limit is checked as each
  byte arrives), and ``INSTANT`` when nothing needs waiting for (a literal announced, a missing
  STARTTLS, a challenge loop);
- the memory: Python's allocations in this process (every thread, ``tracemalloc``) peak at most
  ``MEMORY_BOUND`` above the start.

Floods send lines of 64 bytes there, as real servers' lines are. A flood of the shortest lines
is what makes a library build the most objects per megabyte: those cases run at full speed in a
fresh process and are measured by its RSS. The config API as a process is measured from
outside while a server floods its connection test.

A client that never stops (a challenge loop) is given up on after its time and the server cut
off, so a test fails instead of hanging. ``pytest -s`` prints each case's figures.
"""

from __future__ import annotations

import base64
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import httpx2
import pytest
from psycopg_pool import ConnectionPool

from shared.db.pool import DictConnection
from shared.email_servers import AuthType, EmailServer, ServerType
from shared.mail import smtp
from shared.mail.connector import Connector
from shared.mail.errors import MailServerError
from shared.mail.imap import ImapMailbox
from shared.mail.pop3 import Pop3Mailbox
from shared.probe import ConnectionProbe, ProbeResult
from shared.settings import Settings
from shared.tokens import MANAGE
from tests.lab.certs import LabCertificates
from tests.lab.fixtures import hostile_servers_fixture  # noqa: F401 - as hostile_servers
from tests.lab.hostile_servers import (
    HUGE_LITERAL,
    LIED_SIZE,
    ONE_BYTE_EVERY,
    FakeServer,
    Protocol,
    Script,
    Security,
)
from tests.support.api import ApiClient, token_for
from tests.support.leaks import password
from tests.support.mail_servers import lab_connector
from tests.support.memory import (
    MiB,
    RssReport,
    RssWatch,
    cost_in_fresh_process,
    in_mib,
    traced_growth,
)
from tests.support.processes import ServiceProcess
from tests.support.tcp import closed_port

TIMEOUT = 2.0  # the connector's timeout here (and the test settings' probe timeout)
INSTANT = 1.0  # seconds for a reason that needs no waiting
FLOODED = TIMEOUT + 1.0
TRICKLED = TIMEOUT + ONE_BYTE_EVERY + 0.5
MAX_REASON = 300  # characters
MEMORY_BOUND = 4 * MiB  # "a few MB": four times the 1 MiB a server may send in one answer
API_RSS_BOUND = 20 * MiB  # the config API process, RSS, while a server floods its test
SECRET = password("hostile")
USER = "hostile@lab.test"
IMAP, POP3, SMTP = Protocol.IMAP, Protocol.POP3, Protocol.SMTP
STARTTLS, IMPLICIT = Security.STARTTLS, Security.IMPLICIT

HostileServers = Callable[..., FakeServer]


# --- the reasons each misbehaviour must end in -------------------------------------------------


def cut(where: str) -> str:
    """An answer cut off by the byte, line or time limit, whichever came first."""
    return (
        r"^server (sent more than ([\d.]+ [KM]iB|10,000 lines) in"
        r"|sent a line longer than [\d,]+ bytes in"
        rf"|took more than {TIMEOUT:g} s to send) {where}"
    )


GREETING = cut("its greeting")
SLOW_GREETING = rf"^server took more than {TIMEOUT:g} s to send its greeting"
SLOW_ANSWER = rf"^server took more than {TIMEOUT:g} s to send its answer"
HUGE = rf"^server announced {HUGE_LITERAL} bytes in its answer to {{}}, more than the 1 MiB"
LIED = r"^server announced \d+ bytes in its answer to UID FETCH, more than the 1 MiB allowed"
CHALLENGES = r"(?i)\b(challenges?|loop|rounds?)\b|^authentication failed"
NO_STARTTLS = r"no longer offers (STARTTLS|STLS), which it offered before"


@dataclass(frozen=True)
class Case:
    protocol: Protocol
    script: Script
    reason: str  # a regular expression the reason must match
    within: float  # seconds
    security: Security = Security.PLAIN
    oauth: bool = False

    @property
    def id(self) -> str:
        parts = [self.protocol.value, self.script.value.replace(" ", "_")]
        if self.security is not Security.PLAIN:
            parts.append(self.security.value)
        if self.oauth:
            parts.append("oauth2")
        return "-".join(parts)


class NotBounded(AssertionError):
    """What a test proves did not hold: the reason, its time or the memory it cost."""


def case(*args: Any, **kwargs: Any) -> Any:
    """A :class:`Case` as a test parameter."""
    value = Case(*args, **kwargs)
    return pytest.param(value, id=value.id)


def check(holds: bool, message: str) -> None:
    if not holds:
        raise NotBounded(message)


# --- running an attempt ---------------------------------------------------------------------


@dataclass
class Outcome:
    """How an attempt against a hostile server ended."""

    reason: str | None = None
    value: Any = None
    seconds: float = 0.0
    memory: int = 0  # peak growth of Python's allocations, bytes
    finished: bool = False
    error: BaseException | None = None  # anything but a MailServerError: the test's own failure

    def __str__(self) -> str:
        ended = f"reason: {self.reason!r}" if self.finished else "still running"
        return f"{self.seconds:.2f} s, {in_mib(self.memory)}, {ended}"


def attempt(fake: FakeServer, action: Callable[[], Any], give_up_after: float) -> Outcome:
    """Runs ``action`` against ``fake`` in a thread, measuring time and memory; after
    ``give_up_after`` seconds the server is cut off, so that a client that never stops ends."""
    outcome = Outcome()

    def run() -> None:
        try:
            result = action()
        except MailServerError as error:
            outcome.reason = error.reason
        except Exception as error:  # noqa: BLE001 - raised again in the test's own thread
            outcome.error = error
        else:
            outcome.value = result
            if isinstance(result, ProbeResult):
                outcome.reason = result.reason
            elif isinstance(result, dict):
                outcome.reason = result.get("reason")
        outcome.seconds = time.monotonic() - started

    worker = threading.Thread(target=run, daemon=True)
    with traced_growth() as growth:
        started = time.monotonic()
        worker.start()
        worker.join(give_up_after)
        outcome.finished = not worker.is_alive()
        if not outcome.finished:
            fake.stop()
            worker.join(10)
            # A client that goes on once the server hung up is a failure of its own.
            assert not worker.is_alive(), "still running 10 s after the server hung up"
    outcome.memory = growth.peak
    return outcome


def assert_bounded(outcome: Outcome, case: Case) -> None:
    print(f"\n{case.id}: {outcome}")  # the figures for the closing note (pytest -s)
    if outcome.error is not None:
        raise outcome.error
    check(outcome.finished, f"{case.id}: still reading after {case.within:g} s")
    assert outcome.reason is not None, f"{case.id}: no failure at all ({outcome.value!r})"
    check(bool(re.search(case.reason, outcome.reason)), f"the reason: {outcome.reason}")
    check(len(outcome.reason) <= MAX_REASON, f"{len(outcome.reason)} characters")
    check(outcome.seconds <= case.within, f"{outcome.seconds:.2f} s: {outcome.reason}")
    check(outcome.memory <= MEMORY_BOUND, f"{in_mib(outcome.memory)}: {outcome.reason}")


def run_case(fake: FakeServer, case: Case, action: Callable[[], Any]) -> None:
    assert_bounded(attempt(fake, action, case.within), case)
    if case.script is Script.NO_STARTTLS:
        assert sent_secret(fake) == 0, "the password reached a server without TLS"


# --- the fake servers as Mailroom sees them -------------------------------------------------


def fake_server(fake: FakeServer, *, oauth: bool = False, **changes: Any) -> EmailServer:
    """An unsaved server of ``fake``'s type on its port."""
    inbound = fake.protocol is not Protocol.SMTP
    values: dict[str, Any] = {
        "id": "00000000-0000-0000-0000-00000000f00d",
        "tenant_id": "acme",
        "type": ServerType(fake.protocol.value),
        "name": "hostile",
        "host": "127.0.0.1",
        "port": fake.port,
        "tls": fake.implicit_tls,
        "auth_type": AuthType.OAUTH2 if oauth else AuthType.BASIC,
        "oauth_provider": "google" if oauth else None,
        "enabled": True,
        "version": 1,
        "username": USER,
        "inbox_folder": "INBOX" if fake.protocol is Protocol.IMAP else None,
        "routing_plan_id": "plan" if inbound else None,
    }
    values.update(changes)
    return EmailServer(**values)


def server_for(fake: FakeServer, case: Case) -> EmailServer:
    """The server as the case has it; ``NO_STARTTLS``: one whose STARTTLS a test saw before."""
    server = fake_server(fake, oauth=case.oauth)
    if case.script is Script.NO_STARTTLS:
        server = replace(server, starttls_seen_at=server.place)
    return server


def sent_secret(fake: FakeServer) -> int:
    """How often the password reached the server, in any form a login carries it."""
    received = fake.received()
    forms = {SECRET.encode(), base64.b64encode(f"\0{USER}\0{SECRET}".encode())}
    return sum(received.count(form) for form in forms)


def start(hostile_servers: HostileServers, case: Case) -> FakeServer:
    return hostile_servers(case.protocol, case.script, security=case.security)


@pytest.fixture
def connector(mail_lab_certs: LabCertificates) -> Connector:
    return lab_connector(mail_lab_certs, timeout=TIMEOUT)


# --- the connection test --------------------------------------------------------------------

PROBE_CASES = [
    case(IMAP, Script.ENDLESS_GREETING, GREETING, FLOODED),
    case(IMAP, Script.ENDLESS_GREETING, GREETING, FLOODED, IMPLICIT),
    case(IMAP, Script.TRICKLE_GREETING, SLOW_GREETING, TRICKLED),
    case(IMAP, Script.ENDLESS_REPLY, cut("its answer to CAPABILITY"), FLOODED),
    case(IMAP, Script.HUGE_LITERAL_IN_SELECT, HUGE.format("SELECT"), INSTANT),
    case(IMAP, Script.DEFLATE_BOMB, cut("its answer to SELECT"), FLOODED, STARTTLS),
    case(IMAP, Script.SASL_LOOP, CHALLENGES, INSTANT),
    case(IMAP, Script.SASL_LOOP, CHALLENGES, INSTANT, oauth=True),
    case(IMAP, Script.NO_STARTTLS, NO_STARTTLS, INSTANT, STARTTLS),
    case(POP3, Script.ENDLESS_GREETING, GREETING, FLOODED),
    case(POP3, Script.TRICKLE_GREETING, SLOW_GREETING, TRICKLED),
    case(POP3, Script.ENDLESS_REPLY, cut("its answer to CAPA"), FLOODED, IMPLICIT),
    case(POP3, Script.SASL_LOOP, CHALLENGES, INSTANT, oauth=True),
    case(POP3, Script.NO_STARTTLS, NO_STARTTLS, INSTANT, STARTTLS),
    case(SMTP, Script.ENDLESS_GREETING, GREETING, FLOODED),
    case(SMTP, Script.ENDLESS_MULTILINE_GREETING, GREETING, FLOODED),
    case(SMTP, Script.ENDLESS_MULTILINE_GREETING, GREETING, FLOODED, IMPLICIT),
    case(SMTP, Script.TRICKLE_GREETING, SLOW_GREETING, TRICKLED),
    case(SMTP, Script.ENDLESS_REPLY, cut("its answer to EHLO"), FLOODED),
    case(SMTP, Script.SASL_LOOP, CHALLENGES, INSTANT),
    case(SMTP, Script.SASL_LOOP, CHALLENGES, INSTANT, STARTTLS, oauth=True),
    case(SMTP, Script.NO_STARTTLS, NO_STARTTLS, INSTANT, STARTTLS),
]


@pytest.mark.parametrize("case", PROBE_CASES)
def test_the_connection_test_of_a_hostile_server_ends_with_a_bounded_reason(
    case: Case, hostile_servers: HostileServers, connector: Connector
) -> None:
    fake = start(hostile_servers, case)
    probe = ConnectionProbe(connector)
    run_case(fake, case, lambda: probe(server_for(fake, case), SECRET))


@pytest.mark.parametrize("protocol", list(Protocol))
@pytest.mark.parametrize("security", list(Security))
def test_the_polite_fake_servers_pass_the_connection_test(
    protocol: Protocol, security: Security, hostile_servers: HostileServers, connector: Connector
) -> None:
    """The control: each failure above comes from its misbehaviour, not from the fake."""
    fake = hostile_servers(protocol, Script.POLITE, security=security)
    result = ConnectionProbe(connector)(fake_server(fake), SECRET)
    assert result.ok, result.reason
    offered = {"STARTTLS", "STLS"} & set(result.capabilities)
    assert bool(offered) is (security is Security.STARTTLS)


# --- the connection test through the config API ---------------------------------------------

# One case per misbehaviour: the API runs the same probe. An unsaved server has no STARTTLS
# pin (a saved one follows below) and an OAuth2 one no token.
API_CASES = [
    case(IMAP, Script.TRICKLE_GREETING, SLOW_GREETING, TRICKLED),
    case(IMAP, Script.ENDLESS_REPLY, cut("its answer to CAPABILITY"), FLOODED),
    case(IMAP, Script.HUGE_LITERAL_IN_SELECT, HUGE.format("SELECT"), INSTANT),
    case(IMAP, Script.DEFLATE_BOMB, cut("its answer to SELECT"), FLOODED),
    case(IMAP, Script.SASL_LOOP, CHALLENGES, INSTANT),
    case(POP3, Script.ENDLESS_GREETING, GREETING, FLOODED),
    case(SMTP, Script.ENDLESS_MULTILINE_GREETING, GREETING, FLOODED),
    case(SMTP, Script.ENDLESS_REPLY, cut("its answer to EHLO"), FLOODED),
    case(SMTP, Script.SASL_LOOP, CHALLENGES, INSTANT),
]


def api_body(api: ApiClient, fake: FakeServer) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": fake.protocol.value,
        "name": "hostile",
        "host": "127.0.0.1",
        "port": fake.port,
        "tls": fake.implicit_tls,
        "username": USER,
        "password": SECRET,
    }
    if fake.protocol is not Protocol.SMTP:
        body["routing_plan_id"] = api.routing_plan()
    if fake.protocol is Protocol.IMAP:
        body["sni_hostname"] = "localhost"  # an IMAP server at an address needs a TLS name
    return body


@pytest.mark.parametrize("case", API_CASES)
def test_the_config_api_tests_a_hostile_server_with_a_bounded_reason(
    case: Case, api: ApiClient, hostile_servers: HostileServers
) -> None:
    fake = start(hostile_servers, case)
    body = api_body(api, fake)

    def test_connection() -> dict[str, Any]:
        answer = api.post("/email-servers/test", body)
        assert answer.status_code == 200, answer.text
        result: dict[str, Any] = answer.json()
        return result

    run_case(fake, case, test_connection)


def test_an_enabled_save_never_logs_in_where_starttls_is_no_longer_offered(
    api: ApiClient, hostile_servers: HostileServers, pool: ConnectionPool[DictConnection]
) -> None:
    """The server offered STARTTLS when it was tested; now it does not: the save's connection
    test fails with that reason, and the server never sees the password."""
    fake = hostile_servers(Protocol.SMTP, Script.NO_STARTTLS, security=Security.STARTTLS)
    saved = api.create(**{**api_body(api, fake), "enabled": False})
    with pool.connection() as conn:
        conn.execute(
            "UPDATE email_servers SET starttls_seen_at = %s WHERE id = %s",
            (f"127.0.0.1:{fake.port}", saved["id"]),
        )
    answer = api.patch(f"/email-servers/{saved['id']}", {"enabled": True})
    check(sent_secret(fake) == 0, "the password reached a server without TLS")
    assert answer.status_code == 422, answer.text
    assert re.search(NO_STARTTLS, answer.json()["connection"]["reason"])


# --- fetching -----------------------------------------------------------------------------


def read_imap(server: EmailServer, connector: Connector) -> str:
    """What the fetcher does with a mailbox: open, sizes, bodies, a wait in IDLE, close."""
    mailbox = ImapMailbox(server, SECRET, connector)
    mailbox.open()
    try:
        sizes = mailbox.sizes(mailbox.uids_after(0))
        bodies = mailbox.bodies(sizes)
        deadline = time.monotonic() + 0.5
        with mailbox.idling() as watch:
            while time.monotonic() < deadline and not watch.news(0.25):
                pass
        return f"{len(bodies)} mails"
    finally:
        mailbox.close()


def read_pop3(server: EmailServer, connector: Connector) -> str:
    """What the fetcher does with a maildrop: open, list, retrieve, close."""
    mailbox = Pop3Mailbox(server, SECRET, connector)
    mailbox.open()
    try:
        listing = mailbox.listing()
        return f"{len(listing)} mails, the first {len(mailbox.retrieve(listing[0].number))} bytes"
    finally:
        mailbox.close()


READERS = {Protocol.IMAP: read_imap, Protocol.POP3: read_pop3}

# POP3 sizes that lie are left to the POP3 client's rewrite (its own tests).
FETCH_CASES = [
    case(IMAP, Script.ENDLESS_GREETING, GREETING, FLOODED),
    case(IMAP, Script.TRICKLE_GREETING, SLOW_GREETING, TRICKLED),
    case(IMAP, Script.ENDLESS_REPLY, cut("its answer to CAPABILITY"), FLOODED, IMPLICIT),
    case(IMAP, Script.HUGE_LITERAL_IN_SELECT, HUGE.format("SELECT"), INSTANT),
    case(IMAP, Script.HUGE_LITERAL_IN_FETCH, HUGE.format("UID FETCH"), INSTANT),
    case(IMAP, Script.LYING_SIZE, LIED, INSTANT),
    case(IMAP, Script.DEFLATE_BOMB, cut("its answer to SELECT"), FLOODED),
    case(IMAP, Script.ENDLESS_IDLE, cut("its answer to IDLE"), FLOODED),
    case(IMAP, Script.SASL_LOOP, CHALLENGES, INSTANT),
    case(IMAP, Script.NO_STARTTLS, NO_STARTTLS, INSTANT, STARTTLS),
    case(POP3, Script.ENDLESS_GREETING, GREETING, FLOODED),
    case(POP3, Script.TRICKLE_GREETING, SLOW_GREETING, TRICKLED),
    case(POP3, Script.ENDLESS_REPLY, cut("its answer to CAPA"), FLOODED),
    case(POP3, Script.NO_STARTTLS, NO_STARTTLS, INSTANT, STARTTLS),
]


@pytest.mark.parametrize("case", FETCH_CASES)
def test_fetching_from_a_hostile_server_ends_with_a_bounded_reason(
    case: Case, hostile_servers: HostileServers, connector: Connector
) -> None:
    fake = start(hostile_servers, case)
    read = READERS[case.protocol]
    run_case(fake, case, lambda: read(server_for(fake, case), connector))


@pytest.mark.parametrize("protocol", [Protocol.IMAP, Protocol.POP3])
@pytest.mark.parametrize("security", [Security.IMPLICIT, Security.STARTTLS])
def test_the_polite_fake_servers_hand_over_their_mail(
    protocol: Protocol, security: Security, hostile_servers: HostileServers, connector: Connector
) -> None:
    fake = hostile_servers(protocol, Script.POLITE, security=security)
    assert READERS[protocol](fake_server(fake), connector).startswith("1 mails")


def test_an_imap_fetch_is_bounded_by_the_size_the_server_told(
    hostile_servers: HostileServers, connector: Connector
) -> None:
    """The FETCH may hold the checked size and little more: a lie about the size is refused
    before the body is read, however large the body is."""
    fake = hostile_servers(Protocol.IMAP, Script.LYING_SIZE)
    with ImapMailbox(fake_server(fake), SECRET, connector) as mailbox:
        assert mailbox.sizes([1]) == {1: LIED_SIZE}
        assert len(fake.mails[0]) > 3_000_000
        with pytest.raises(MailServerError, match=LIED):
            mailbox.bodies({1: LIED_SIZE})


# --- sending ------------------------------------------------------------------------------


def send_mail(server: EmailServer, connector: Connector) -> tuple[int, str]:
    """What the sender does: a session, one transaction, QUIT."""
    session = smtp.open_session(server, SECRET, connector)
    try:
        return smtp.send_transaction(
            session, USER, ["customer@example.org"], b"Subject: hello\r\n\r\nHello.\r\n"
        )
    finally:
        session.close()


SEND_CASES = [
    case(SMTP, Script.ENDLESS_GREETING, GREETING, FLOODED),
    case(SMTP, Script.ENDLESS_MULTILINE_GREETING, GREETING, FLOODED),
    case(SMTP, Script.TRICKLE_GREETING, SLOW_GREETING, TRICKLED),
    case(SMTP, Script.ENDLESS_REPLY, cut("its answer to EHLO"), FLOODED),
    case(SMTP, Script.SASL_LOOP, CHALLENGES, INSTANT),
    case(SMTP, Script.SASL_LOOP, CHALLENGES, INSTANT, oauth=True),
    case(SMTP, Script.NO_STARTTLS, NO_STARTTLS, INSTANT, STARTTLS),
    case(SMTP, Script.ENDLESS_FINAL_REPLY, cut("its answer"), FLOODED),
    case(SMTP, Script.ENDLESS_FINAL_REPLY, cut("its answer"), FLOODED, STARTTLS),
    case(SMTP, Script.TRICKLE_FINAL_REPLY, SLOW_ANSWER, TRICKLED),
]


@pytest.mark.parametrize("case", SEND_CASES)
def test_sending_to_a_hostile_server_ends_with_a_bounded_reason(
    case: Case, hostile_servers: HostileServers, connector: Connector
) -> None:
    fake = start(hostile_servers, case)
    run_case(fake, case, lambda: send_mail(server_for(fake, case), connector))


@pytest.mark.parametrize("security", list(Security))
def test_the_polite_fake_smtp_server_takes_a_mail(
    security: Security, hostile_servers: HostileServers, connector: Connector
) -> None:
    fake = hostile_servers(Protocol.SMTP, Script.POLITE, security=security)
    assert send_mail(fake_server(fake), connector)[0] == 250
    assert b"Subject: hello\r\n\r\nHello.\r\n.\r\n" in fake.received()


# --- floods of the shortest lines, at full speed in a fresh process --------------------------


def _read_the_server(protocol: str, port: int) -> str | None:
    """Runs in a fresh process: what the services do with a server; the failure's reason."""
    fake = EmailServer(
        id="",
        tenant_id="acme",
        type=ServerType(protocol),
        name="flood",
        host="127.0.0.1",
        port=port,
        tls=False,
        auth_type=AuthType.BASIC,
        enabled=True,
        version=1,
        username=USER,
        inbox_folder="INBOX",
    )
    connector = Connector.from_settings(Settings(), TIMEOUT)
    try:
        if protocol == "smtp":
            send_mail(fake, connector)
        else:
            READERS[Protocol(protocol)](fake, connector)
    except MailServerError as error:
        return error.reason
    return None


def _warm_up(protocol: str, polite_port: int, flood_port: int) -> None:
    assert _read_the_server(protocol, polite_port) is None


def _flood(protocol: str, polite_port: int, flood_port: int) -> str | None:
    return _read_the_server(protocol, flood_port)


@pytest.mark.parametrize(
    ("protocol", "script", "reason"),
    [
        pytest.param(
            SMTP,
            Script.ENDLESS_MULTILINE_GREETING,
            GREETING,
            id="smtp-greeting",
        ),
        pytest.param(
            POP3,
            Script.ENDLESS_REPLY,
            cut("its answer to CAPA"),
            id="pop3-CAPA",
        ),
        pytest.param(
            IMAP,
            Script.ENDLESS_IDLE,
            cut("its answer to IDLE"),
            id="imap-IDLE",
        ),
    ],
)
def test_a_flood_of_the_shortest_lines_costs_a_process_at_most_a_few_mb(
    protocol: Protocol, script: Script, reason: str, hostile_servers: HostileServers
) -> None:
    polite = hostile_servers(protocol, Script.POLITE)
    fake = hostile_servers(protocol, script, flood_line=0)  # the most lines a MiB can hold
    started = time.monotonic()
    found, report = cost_in_fresh_process(
        _flood, protocol.value, polite.port, fake.port, warm_up=_warm_up, timeout=30
    )
    seconds = time.monotonic() - started
    print(
        f"\n{protocol} {script}, shortest lines: {report}, {seconds:.1f} s with the process;"
        f" reason: {found!r}"
    )
    assert found is not None, "no failure at all"
    check(bool(re.search(reason, found)), f"the reason: {found}")
    check(report.growth <= MEMORY_BOUND, str(report))


# --- the config API as a process, measured from outside ----------------------------------------


@pytest.fixture(scope="module")
def config_api_process() -> Iterator[tuple[ServiceProcess, str]]:
    port = closed_port()
    process = ServiceProcess("run", "config-api", env={"MAILROOM_API_PORT": str(port)})
    try:
        process.wait_for_log("Uvicorn running", timeout=30)
        yield process, f"http://127.0.0.1:{port}/api/v1"
    finally:
        process.kill()


@pytest.mark.parametrize(
    ("protocol", "script"),
    [
        (Protocol.SMTP, Script.ENDLESS_MULTILINE_GREETING),
        (Protocol.IMAP, Script.ENDLESS_GREETING),
        (Protocol.POP3, Script.ENDLESS_GREETING),
    ],
    ids=["smtp", "imap", "pop3"],
)
def test_the_config_api_process_stays_small_while_a_server_floods_its_greeting(
    protocol: Protocol,
    script: Script,
    config_api_process: tuple[ServiceProcess, str],
    hostile_servers: HostileServers,
    settings: Settings,
) -> None:
    process, base = config_api_process
    headers = {"Authorization": f"Bearer {token_for(settings, 'acme', [MANAGE])}"}
    body: dict[str, Any] = {
        "type": protocol.value,
        "name": "flood",
        "host": "127.0.0.1",
        "tls": False,
        "username": USER,
        "password": SECRET,
    }
    if protocol is not Protocol.SMTP:
        plan = httpx2.post(f"{base}/routing-plans", json={"name": "plan"}, headers=headers)
        body["routing_plan_id"] = plan.json()["id"]
    if protocol is Protocol.IMAP:
        body["sni_hostname"] = "localhost"

    def test_connection(port: int) -> dict[str, Any]:
        answer = httpx2.post(
            f"{base}/email-servers/test", json={**body, "port": port}, headers=headers, timeout=30
        )
        assert answer.status_code == 200, answer.text
        result: dict[str, Any] = answer.json()
        return result

    # The first test of a protocol loads its code and buffers: not what a flood costs.
    assert test_connection(hostile_servers(protocol, Script.POLITE).port)["ok"]
    fake = hostile_servers(protocol, script)
    with RssWatch(process.process.pid) as watch:
        started = time.monotonic()
        result = test_connection(fake.port)
        seconds = time.monotonic() - started
        time.sleep(0.2)  # "after": once the probe's thread has let go
    report = watch.report
    assert isinstance(report, RssReport)
    print(
        f"\nconfig API, {protocol} greeting flood: {seconds:.2f} s, {report}, {result['reason']!r}"
    )
    assert result["ok"] is False and result["reason"]
    assert seconds <= FLOODED
    assert report.growth <= API_RSS_BOUND, str(report)
