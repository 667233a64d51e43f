"""A stored password goes only to the host, port, TLS setting and user it was typed for.

The new place in each test is a server on loopback that lets anyone log in without TLS and
records every byte it receives (``RecordingServer``): the password must never reach it, in
plain text or base64, neither through the save nor through the enabled save's connection
test. The control at the end of each protocol's test shows that a password typed for the new
place does reach it, so the recorder would have seen a leak.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.api import ApiClient
from tests.support.leaks import password
from tests.support.recording_server import RecordingServer
from tests.support.tcp import closed_port

PROTOCOLS = ["smtp", "imap", "pop3"]


@pytest.fixture(params=PROTOCOLS)
def recorder(request: pytest.FixtureRequest) -> Iterator[RecordingServer]:
    with RecordingServer(request.param) as server:
        yield server


def saved(api: ApiClient, protocol: str, secret: str, **fields: Any) -> dict[str, Any]:
    """A disabled server of ``protocol`` with ``secret`` stored (never tested: no connection)."""
    body: dict[str, Any] = {
        "type": protocol,
        "name": f"{protocol} mailbox",
        "host": "localhost",
        "port": closed_port(),
        "tls": False,
        "username": "agent@example.com",
        "password": secret,
        "enabled": False,
    }
    if protocol != "smtp":
        body["routing_plan_id"] = api.routing_plan()
    return api.create(**{**body, **fields})


def refused_for_password(answer: Any) -> str:
    assert answer.status_code == 422, answer.text
    problems = answer.json()["detail"]
    assert [p["field"] for p in problems] == ["password"], problems
    message: str = problems[0]["msg"]
    assert "enter the password again" in message
    return message


RECORDER = "<the recorder's port>"
# (the server as saved, the change): after each change the recorder is where the server points.
MOVES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "host": ({"host": "mail.invalid", "port": RECORDER}, {"host": "localhost"}),
    "port": ({"port": "closed"}, {"port": RECORDER}),
    "host and port": ({"host": "mail.invalid"}, {"host": "localhost", "port": RECORDER}),
    "TLS setting": ({"port": RECORDER, "tls": True}, {"tls": False}),
    "user": ({"port": RECORDER}, {"username": "intruder@example.com"}),
}


def placed(fields: dict[str, Any], recorder: RecordingServer) -> dict[str, Any]:
    ports = {RECORDER: recorder.port, "closed": closed_port()}
    return {name: ports.get(value, value) for name, value in fields.items()}


@pytest.mark.parametrize("moved", list(MOVES))
def test_a_change_of_place_without_the_password_is_refused_and_nothing_reaches_it(
    api: ApiClient, recorder: RecordingServer, moved: str
) -> None:
    before, change = placed(MOVES[moved][0], recorder), placed(MOVES[moved][1], recorder)
    secret = password(f"{recorder.protocol}-{moved}")
    server = saved(api, recorder.protocol, secret, **before)
    path = f"/email-servers/{server['id']}"

    inactive = refused_for_password(api.patch(path, change))
    assert f"the {moved} changed" in inactive
    refused_for_password(api.patch(path, {**change, "enabled": True}))  # no connection test

    assert api.get(path).json() == server  # nothing saved, the password kept
    assert recorder.connections == 0
    assert not recorder.saw(secret)


def test_a_password_typed_with_the_new_place_goes_there_and_the_old_one_never(
    api: ApiClient, recorder: RecordingServer
) -> None:
    stored, typed = password(f"{recorder.protocol}-stored"), f"typed-{recorder.protocol}-9f3"
    server = saved(api, recorder.protocol, stored, host="mail.invalid")
    moved = api.patch(
        f"/email-servers/{server['id']}",
        {"host": "localhost", "port": recorder.port, "enabled": True, "password": typed},
    )
    assert moved.status_code == 200, moved.text
    assert moved.json()["connection"]["ok"] is True
    assert recorder.saw(typed)  # the recorder would have seen the stored one
    assert not recorder.saw(stored)


def test_removing_the_password_with_the_move_is_allowed(
    api: ApiClient, recorder: RecordingServer
) -> None:
    secret = password(f"{recorder.protocol}-removed")
    server = saved(api, recorder.protocol, secret, host="mail.invalid")
    moved = api.patch(
        f"/email-servers/{server['id']}",
        {"host": "localhost", "port": recorder.port, "password": None},
    )
    assert moved.status_code == 200, moved.text
    assert moved.json()["has_password"] is False
    assert not recorder.saw(secret)


def test_other_changes_keep_the_stored_password(api: ApiClient) -> None:
    server = saved(api, "smtp", password("kept"), port=None)
    same_place = {"name": "renamed", "description": "d", "port": 587}  # 587: the default port
    answer = api.patch(f"/email-servers/{server['id']}", same_place)
    assert answer.status_code == 200, answer.text
    assert answer.json()["has_password"] is True
