"""schemathesis against the config API's and the status service's OpenAPI documents.

Every operation is fuzzed with data its schema allows (positive) and data it forbids
(negative), with a valid token and without one, and every answer is checked by schemathesis's
checks: no 5xx, only documented status codes, bodies and headers as documented, valid data
accepted and invalid data refused. The figures are printed (``FIGURE``) and the test fails
on any failure.

The fuzzer invents host names and addresses and saves enabled servers, so the config API's
connection test would connect to them: here its network policy denies every network but
loopback, its resolver answers IP literals and ``localhost`` only (no DNS query leaves the
machine), and an audit hook records every socket the process connects while the fuzzer runs:
each must be on loopback.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given
from hypothesis import strategies as st
from psycopg_pool import ConnectionPool
from schemathesis import GenerationMode
from schemathesis.core.failures import FailureGroup
from schemathesis.generation.case import Case
from schemathesis.python.asgi import shutdown_lifespans

from services.config_api.app import create_app as create_config_api
from services.config_api.server_rules import defaults_for
from services.status.app import create_app as create_status_app
from services.status.worker import StatusWorker
from shared.db import email_servers as repo
from shared.db import routing_plans
from shared.db.pool import DictConnection
from shared.email_servers import ServerType
from shared.mail.connector import Connector
from shared.mail.network_policy import NetworkPolicy, Resolved, parse_networks
from shared.probe import ConnectionProbe
from shared.secrets import SecretBox
from shared.settings import Settings
from shared.tokens import MANAGE, READ
from tests.support.api import token_for

AnyCase = Case[Any]
LOOPBACK = parse_networks("127.0.0.0/8,::1/128")
# Per operation, generation mode and token: about 2,000 cases, a minute on this machine.
# MAILROOM_FUZZ_EXAMPLES=500 runs a deeper search by hand.
EXAMPLES_PER_OPERATION = int(os.environ.get("MAILROOM_FUZZ_EXAMPLES", "40"))
# Answers a schema-valid request may get: 422 for the rules JSON Schema cannot state (see
# Tally.check), 409/412/429 for the state of the installation. The OAuth2 callback answers 400
# to any consent that was never started, and the fuzzer can start none.
_ACCEPTED = ["2xx", "401", "403", "404", "409", "412", "422", "429"]
CONFIG = schemathesis.Config.from_dict(
    {
        "max-stream-events": 1,  # a stream is read up to its snapshot, then closed
        # Unknown query parameters are ignored, as by most APIs; the token is the test's to set.
        "generation": {"allow-extra-parameters": False, "with-security-parameters": False},
        "checks": {"positive_data_acceptance": {"expected-statuses": _ACCEPTED}},
        "operations": [
            {
                "include-name": "GET /api/v1/oauth/callback",
                "checks": {"positive_data_acceptance": {"expected-statuses": [*_ACCEPTED, "400"]}},
            }
        ],
    }
)
# The only 422 a schema-valid request may get: a rule beyond JSON Schema (pydantic's
# value_error, e.g. a host name IDNA refuses, or a rule across fields) or a failed connection
# test. A type or shape error (int_type, missing, extra_forbidden, ...) means the document and
# the app disagree.
RULE_ERROR = "value_error"


@dataclass
class ConnectionLog:
    """Every socket connect of this process while recording, and every host the policy saw."""

    recording: bool = False
    connects: list[Any] = field(default_factory=list)
    looked_up: list[tuple[str, int]] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    def audit(self, event: str, args: tuple[Any, ...]) -> None:
        if self.recording and event == "socket.connect":
            self.connects.append(args[1])

    def off_loopback(self) -> list[Any]:
        """Every connect to an IP address outside loopback (a Unix socket is no address)."""
        return [a for a in self.connects if isinstance(a, tuple) and not is_loopback(a[0])]


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(str(address).split("%", 1)[0])
    return any(ip in network for network in LOOPBACK)


LOG = ConnectionLog()


def numeric_resolver(host: str, port: int) -> list[tuple[Any, ...]]:
    """``getaddrinfo`` for literals and ``localhost`` only: an invented name fails as if it did
    not exist, and no DNS query is sent."""
    LOG.looked_up.append((host, port))
    if host.rstrip(".").lower() == "localhost":
        host = "127.0.0.1"
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)


@dataclass(frozen=True)
class RecordingPolicy(NetworkPolicy):
    """The installation's policy, noting every address it let through."""

    def resolve(self, host: str, port: int) -> list[Resolved]:
        resolved = super().resolve(host, port)
        LOG.checked.extend(target.address for target in resolved)
        return resolved


@dataclass
class Tally:
    """What the fuzzer did and found, per API."""

    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    failures: dict[str, str] = field(default_factory=dict)  # title -> first report

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    def check(self, case: AnyCase, mode: GenerationMode, headers: dict[str, str]) -> None:
        response = case.call(headers=headers)
        self.cases += 1
        self.statuses[response.status_code] += 1
        try:
            case.validate_response(response, headers=headers)
        except FailureGroup as group:
            for failure in group.exceptions:
                key = f"{case.operation.label}: {failure.title}"
                self.failures.setdefault(key, str(group)[:3000])
        if mode is GenerationMode.POSITIVE and response.status_code == 422:
            refused = _not_rules(response.json())
            if refused:
                key = f"{case.operation.label}: schema-valid request refused for {refused}"
                self.failures.setdefault(key, f"{case.as_curl_command()}\n{response.text[:2000]}")


def _not_rules(body: dict[str, Any]) -> list[str]:
    """The error types of a 422 answer that are not rules beyond JSON Schema."""
    detail = body.get("detail")
    if "connection" in body or not isinstance(detail, list):
        return []
    return sorted({str(e.get("type")) for e in detail if e.get("type") != RULE_ERROR})


@dataclass(frozen=True)
class Scene:
    """What exists for the fuzzer's tenant: a server of each type and a routing plan."""

    server_ids: tuple[str, ...] = ()
    routing_plan_id: str | None = None

    def seed(self, case: AnyCase) -> AnyCase:
        """Most cases that name a server name one that exists, so that the rules of a real
        server are fuzzed too, not only "not found"."""
        server_id = (case.path_parameters or {}).get("server_id")
        if server_id is not None and self.server_ids:
            pick = zlib.crc32(str(server_id).encode()) % (len(self.server_ids) + 1)
            if pick:
                case.path_parameters = {
                    **case.path_parameters,
                    "server_id": self.server_ids[pick - 1],
                }
        return case

    def with_invented_host(self, case: AnyCase) -> st.SearchStrategy[AnyCase]:
        """The case as generated, or its connection settings alone with an invented host.

        Random text seldom passes IDNA and the other fields' rules, so without this the
        connection test would hardly ever run; with it, it meets hosts of every kind.
        """
        body = case.body
        if not isinstance(body, dict) or "host" not in body:
            return st.just(case)
        essential = {k: v for k, v in body.items() if k in CONNECTION_FIELDS}
        if body.get("type") in ("imap", "pop3") and self.routing_plan_id:
            essential["routing_plan_id"] = self.routing_plan_id

        def hosted(host: str) -> AnyCase:
            case.body = {**essential, "host": host}  # this draw's case, made for it alone
            return case

        return st.one_of(st.just(case), INVENTED_HOSTS.map(hosted))


# What a connection needs; the other fields' rules are fuzzed by the unchanged cases.
CONNECTION_FIELDS = {"type", "name", "port", "tls", "enabled", "username", "password"}
# Hosts as an admin (or an attacker) may name them: every range, IPv4 hidden in IPv6 or
# written as one number, names that resolve nowhere, loopback.
INVENTED_HOSTS = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=4).map(lambda address: f"::ffff:{address}"),
    st.ip_addresses(v=4).map(lambda address: str(int(address))),
    st.sampled_from(["localhost", "127.0.0.1", "::1", "169.254.169.254", "metadata.internal"]),
    st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z]{2,6}){1,2}\Z"),
)


def fuzz(
    schema: schemathesis.BaseSchema, tally: Tally, headers: dict[str, str], scene: Scene
) -> None:
    """Run each operation's positive and negative strategies through ``tally``."""
    settings = hypothesis.settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr] # an unusable schema fails here
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            cases = operation.as_strategy(generation_mode=mode)
            if mode is GenerationMode.POSITIVE:
                cases = cases.flatmap(scene.with_invented_host)
            test = checking(mode, tally, headers, scene)
            try:
                settings(given(case=cases)(test))()
            except hypothesis.errors.Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # nothing to break in this operation


def checking(
    mode: GenerationMode, tally: Tally, headers: dict[str, str], scene: Scene
) -> Callable[[AnyCase], None]:
    def run(case: AnyCase) -> None:
        tally.check(scene.seed(case), mode, {**dict(case.headers or {}), **headers})

    return run


def report(name: str, tally: Tally, seconds: float) -> None:
    statuses = ", ".join(f"{s}: {n}" for s, n in sorted(tally.statuses.items()))
    print(
        f"\nFIGURE schemathesis {name}: {tally.cases} cases in {seconds:.0f} s, "
        f"{tally.server_errors} with status 5xx, {len(tally.failures)} failures ({statuses})"
    )
    for title, text in tally.failures.items():
        print(f"--- {title}\n{text}")


@pytest.fixture(scope="module")
def fuzz_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "denied_networks": "0.0.0.0/0,::/0",
            "allowed_networks": "127.0.0.0/8,::1/128",
            "probe_timeout_seconds": 1.0,
        }
    )


@pytest.fixture(scope="module")
def config_api(fuzz_settings: Settings) -> Iterator[FastAPI]:
    sys.addaudithook(LOG.audit)  # stays for the process; LOG.recording gates it
    policy = RecordingPolicy(
        parse_networks(fuzz_settings.denied_networks),
        parse_networks(fuzz_settings.allowed_networks),
        resolver=numeric_resolver,
    )
    connector = Connector(policy, timeout=fuzz_settings.probe_timeout_seconds)
    app = create_config_api(fuzz_settings, probe=ConnectionProbe(connector), run_relay=False)
    yield app
    shutdown_lifespans()


@pytest.fixture(scope="module")
def status_app(fuzz_settings: Settings, pool: ConnectionPool[DictConnection]) -> Iterator[FastAPI]:
    worker = StatusWorker(fuzz_settings, pool)
    thread = worker.start_in_thread()
    # Ready before the fuzzing starts: a /healthz answered 503 while it connects is right,
    # and schemathesis counts every 5xx as a server error.
    assert worker.connected.wait(20), "the status worker did not connect to RabbitMQ"
    try:
        yield create_status_app(fuzz_settings, worker)
    finally:
        shutdown_lifespans()
        worker.stop()
        thread.join(timeout=5)


def scene_for(pool: ConnectionPool[DictConnection], tenant: str) -> Scene:
    """One server of each type for the fuzzer's tenant (the SMTP one with a password, to
    meet the rule that a stored password follows its place) and a routing plan."""
    ids = []
    with pool.connection() as conn:
        plan = routing_plans.create(conn, tenant, "fuzzed")
        for server_type in ServerType:
            columns = {**defaults_for(server_type), "name": f"fuzzed {server_type}"}
            columns.update(host="127.0.0.1", username="fuzz@example.com")
            if server_type is ServerType.SMTP:
                columns["password_encrypted"] = SecretBox.from_settings(Settings()).encrypt("x")
            ids.append(repo.insert(conn, tenant, columns).id)
    return Scene(tuple(ids), plan.id)


def test_config_api_answers_every_fuzzed_request_as_documented(
    config_api: FastAPI, fuzz_settings: Settings, pool: ConnectionPool[DictConnection]
) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", config_api, config=CONFIG)
    tenant = "fuzz"
    manage = token_for(fuzz_settings, tenant, [MANAGE, READ])
    read_only = token_for(fuzz_settings, tenant, [READ])
    scene = scene_for(pool, tenant)
    tally = Tally()
    started = time.monotonic()
    LOG.recording = True
    try:
        fuzz(schema, tally, {"Authorization": f"Bearer {manage}"}, scene)
        fuzz(schema, tally, {"Authorization": f"Bearer {read_only}"}, scene)
        fuzz(schema, tally, {}, scene)
    finally:
        LOG.recording = False
    report("config API", tally, time.monotonic() - started)
    print(
        f"FIGURE the fuzzer's connection tests: {len(LOG.looked_up)} host lookups "
        f"({len(set(LOG.looked_up))} distinct), {len(LOG.checked)} addresses let through, "
        f"{len(LOG.connects)} sockets connected, {len(LOG.off_loopback())} off loopback"
    )
    assert tally.server_errors == 0
    assert tally.failures == {}
    assert LOG.looked_up, "the fuzzer never reached the connection test"
    assert LOG.off_loopback() == []
    assert all(is_loopback(address) for address in LOG.checked)


def test_status_service_answers_every_fuzzed_request_as_documented(
    status_app: FastAPI, fuzz_settings: Settings
) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", status_app, config=CONFIG)
    reader = token_for(fuzz_settings, "fuzz", [READ])
    tally = Tally()
    started = time.monotonic()
    fuzz(schema, tally, {"Authorization": f"Bearer {reader}"}, Scene())
    fuzz(schema, tally, {}, Scene())
    report("status service", tally, time.monotonic() - started)
    assert tally.server_errors == 0
    assert tally.failures == {}
