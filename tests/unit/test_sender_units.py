"""The sender's pure logic: command validation, MIME building, server resolution."""

from __future__ import annotations

import base64
import contextlib
import email
import email.policy
import itertools
import json
import re
import types
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any, cast

import pytest

from services.sender import mime
from services.sender.mime import MimeError, build
from services.sender.resolver import NoRoute, Resolver
from services.sender.results import ResultStream
from shared.contracts.send import InvalidCommand, SendCommand, SendResult, parse_command
from shared.email_servers import AuthType, EmailServer, Role, ServerType
from shared.mail.smtp import PIPELINING_GROUP_BYTES
from shared.mail.smtp import _dot_stuffed as dot_stuffed
from shared.mail.smtp import _groups as pipelining_groups
from shared.server_directory import ServerDirectory
from shared.settings import Settings


def cmd(**fields: Any) -> SendCommand:
    body: dict[str, Any] = {"request_id": "r-1", "tenant_id": "acme", "to": ["a@example.org"]}
    body.update(fields)
    return SendCommand.model_validate(body)


def parsed(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


# --- the contract --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"tenant_id": "acme", "to": ["a@example.org"]}', "request_id: Field required"),
        (b'{"request_id": "r", "tenant_id": "acme"}', "no recipient"),
        (b'{"request_id": "r", "tenant_id": "acme", "to": ["not an address"]}', "to.0"),
        (b'{"request_id": "r", "tenant_id": "acme", "to": ["a@x.org"], "kind": "x"}', "kind"),
        (
            b'{"request_id": "r", "tenant_id": "acme", "to": ["a@x.org"],'
            b' "reply_to": "b@x.org\\n"}',
            "reply_to: Value error, must not contain line breaks",
        ),
        (
            b'{"request_id": "r", "tenant_id": "acme", "to": ["a@x.org"],'
            b' "headers": {"X-A": "=?utf-8?b?YQ1iCg==?="}}',
            "encoded line breaks",
        ),
        (
            b'{"request_id": "r", "tenant_id": "acme", "to": ["a@x.org"],'
            b' "headers": {"Bad Name": "v"}}',
            "not a header field name",
        ),
        (
            b'{"request_id": "r", "tenant_id": "acme", "to": ["a@x.org"],'
            b' "attachments": [{"filename": "a", "data_base64": "abc"}]}',
            "is not valid base64",
        ),
        (
            b'{"request_id": "r", "tenant_id": "acme", "to": ["a@x.org"], "text": "a\\u0000b"}',
            "text: must not contain NUL characters",
        ),
        (
            b'{"request_id": "r", "tenant_id": "acme", "to": ["a@x.org"], "subject": "\\uDC00"}',
            "subject: must not contain a lone surrogate",
        ),
        (
            b'{"request_id": "r", "tenant_id": "acme", "to": ["a@x.org"],'
            b' "extra": [{"x\\u0000": 1}]}',
            "extra.0 (a field name): must not contain NUL",
        ),
        # Python reads them, jsonb refuses them.
        (b'{"request_id": "r", "tenant_id": "acme", "x": NaN}', "NaN is not a JSON number"),
        (b'{"request_id": "r", "tenant_id": "acme", "x": -Infinity}', "not a JSON number"),
        (b'{"request_id": "r", "tenant_id": "acme", "x": 1e400}', "1e400 is too large"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_invalid_commands_name_the_problem(body: bytes, problem: str) -> None:
    with pytest.raises(InvalidCommand) as caught:
        parse_command(body)
    assert problem in caught.value.reason


def test_an_invalid_command_with_a_lone_surrogate_in_its_id_can_still_be_answered() -> None:
    with pytest.raises(InvalidCommand) as caught:
        parse_command(b'{"request_id": "r\\ud800", "tenant_id": "acme", "to": ["a@x.org"]}')
    invalid = caught.value
    assert invalid.request_id == "r?"
    assert "request_id: must not contain a lone surrogate" in invalid.reason
    answer = SendResult(
        request_id=invalid.request_id,
        tenant_id=invalid.tenant_id,
        status="failed",
        final=True,
        reason=invalid.reason,
    )
    assert json.loads(answer.model_dump_json())["request_id"] == "r?"


@pytest.mark.parametrize(
    "text",
    ["a \\\\u0000 in words", "\\ud83d\\ude00 paired surrogates: an emoji", "\\u00e9t\\u00e9"],
)
def test_escapes_that_postgresql_stores_are_valid(text: str) -> None:
    body = json.dumps({"request_id": "r", "tenant_id": "acme", "to": ["a@x.org"]})
    command, raw = parse_command(body[:-1].encode() + b', "text": "' + text.encode() + b'"}')
    assert command.text == raw["text"] == json.loads(f'"{text}"')


def test_the_contract_shape_parses_and_results_round_trip() -> None:
    body: dict[str, Any] = {
        "request_id": "r-9",
        "tenant_id": "acme",
        "kind": "template",
        "from": None,
        "to": ["A <a@example.org>"],
        "cc": [],
        "bcc": ["b@example.org", "A@example.org"],
        "reply_to": None,
        "subject": "s",
        "text": "t",
        "html": None,
        "headers": {},
        "attachments": [],
        "in_reply_to": None,
        "future_field": "ignored",
    }
    command, raw = parse_command(json.dumps(body).encode())
    assert raw == body  # kept as published, for retries
    assert command.kind == "template" and command.from_ is None
    assert command.recipients == ["a@example.org", "b@example.org"]
    result = SendResult(request_id="r-9", tenant_id="acme", status="sent", attempts=1)
    again = SendResult.model_validate_json(result.model_dump_json())
    assert again == result
    wire = json.loads(result.model_dump_json())
    for field in (
        "request_id",
        "tenant_id",
        "status",
        "email_server_id",
        "smtp_code",
        "smtp_response",
        "attempts",
        "final",
    ):
        assert field in wire


# --- MIME ------------------------------------------------------------------------------------


def test_mime_has_crlf_utf8_headers_alternative_and_attachment() -> None:
    data = base64.b64encode(bytes(range(256))).decode()
    mail = build(
        cmd(
            to=["Zoë Ærø <zoe@bücher.example>"],
            bcc=["secret@example.org"],
            subject="Ünïcödé ✓",
            text="plain\nbody",
            html="<b>html</b>",
            attachments=[{"filename": "data.bin", "data_base64": data}],
        ),
        "Support <support@acme.com>",
    )
    assert b"\n" not in mail.data.replace(b"\r\n", b"")
    assert mail.data.isascii()
    message = parsed(mail.data)
    assert message["Subject"] == "Ünïcödé ✓"
    assert message["To"].addresses[0].display_name == "Zoë Ærø"
    assert message["To"].addresses[0].domain == "xn--bcher-kva.example"
    assert "Bcc" not in message and b"secret@" not in mail.data
    assert mail.recipients == ["zoe@xn--bcher-kva.example", "secret@example.org"]
    assert mail.envelope_from == "support@acme.com"
    [attachment] = list(message.iter_attachments())
    assert attachment.get_content() == bytes(range(256))
    assert message.get_body(("html",)) is not None


def test_message_id_is_stable_per_request_and_unique_across_requests() -> None:
    one = build(cmd(), "a@acme.com").message_id
    assert build(cmd(), "a@acme.com").message_id == one
    assert build(cmd(request_id="r-2"), "a@acme.com").message_id != one
    assert one.endswith("@acme.com>")


def test_remembered_header_classes_build_the_same_mail_as_the_standard_policy() -> None:
    command = cmd(
        to=["Zoë <zoe@bücher.example>", "b@example.org"],
        cc=["c@example.org"],
        subject="Ünïcödé ✓ " * 12,
        text="plain\nbody",
        html="<b>html</b>",
    )
    mail = build(command, "Support <support@acme.com>")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mime, "SMTP_POLICY", email.policy.SMTP)
        standard = build(command, "Support <support@acme.com>")
    date = re.compile(rb"^Date: .*$", re.MULTILINE)
    boundary = re.compile(rb"=+[0-9]+==")
    assert boundary.sub(b"", date.sub(b"", mail.data)) == boundary.sub(
        b"", date.sub(b"", standard.data)
    )


def test_a_server_without_8bitmime_gets_the_text_as_quoted_printable() -> None:
    command = cmd(subject="Grüße", text="Grüße aus München\n")
    eight_bit = build(command, "a@acme.com")
    seven_bit = build(command, "a@acme.com", eight_bit=False)
    assert eight_bit.eight_bit and not seven_bit.eight_bit
    assert b"Content-Transfer-Encoding: quoted-printable" in seven_bit.data
    parsed = email.message_from_bytes(seven_bit.data, policy=email.policy.default)
    assert parsed.get_content() == "Grüße aus München\r\n"


@pytest.mark.parametrize(
    "data",
    [b"", b".", b"..\r\n", b"a\r\n.b\r\n..c", b"a\n.b", b"\r\n.\r\n", b"x.y\r\n. \r\n"],
)
def test_dot_stuffing_doubles_the_dot_that_starts_any_line(data: bytes) -> None:
    expected = re.sub(rb"(?m)^\.", b"..", data)  # RFC 5321 4.5.2, as smtplib writes it
    expected += b"" if expected.endswith(b"\r\n") else b"\r\n"
    assert dot_stuffed(data) == expected


@pytest.mark.parametrize(("recipients", "groups"), [(1, 1), (60, 1), (500, 5)])
def test_pipelined_commands_go_in_as_few_groups_as_fit_the_network_buffers(
    recipients: int, groups: int
) -> None:
    commands = [("MAIL FROM", "mail FROM:<a@acme.com> SIZE=2075")]
    commands += [("RCPT TO", f"rcpt TO:<customer-{n:04d}@example.org>") for n in range(recipients)]
    commands.append(("DATA", "DATA"))
    found = list(pipelining_groups(commands))

    def size(group: list[tuple[str, str]]) -> int:
        return sum(len(line) + 2 for _, line in group)

    assert [command for group in found for command in group] == commands  # all, in order
    assert all(size(group) <= PIPELINING_GROUP_BYTES for group in found)
    assert all(size(a) + size(b[:1]) > PIPELINING_GROUP_BYTES for a, b in itertools.pairwise(found))
    assert len(found) == groups


def test_results_count_as_confirmed_only_without_gaps() -> None:
    stream = ResultStream("amqp://unused", lambda tokens: None)
    # The broker's confirm callbacks, called as the channel would.
    stream._on_ack(2, False)
    assert stream._confirmed == 0
    stream._on_ack(1, False)
    assert stream._confirmed == 2
    stream._on_ack(5, True)
    assert stream._confirmed == 5


def test_non_ascii_local_part_needs_smtputf8() -> None:
    with pytest.raises(MimeError, match="SMTPUTF8"):
        build(cmd(to=["jörg@example.org"]), "a@acme.com")
    assert build(cmd(to=["jörg@example.org"]), "a@acme.com", allow_smtputf8=True).smtputf8


# --- resolution ------------------------------------------------------------------------------


def smtp(
    name: str, username: str, *addresses: str, tenant: str = "acme", **fields: Any
) -> EmailServer:
    values: dict[str, Any] = {
        "id": name,
        "tenant_id": tenant,
        "type": ServerType.SMTP,
        "name": name,
        "host": "smtp.example.org",
        "tls": False,
        "auth_type": AuthType.BASIC,
        "enabled": True,
        "version": 1,
        "username": username,
        "sender_addresses": addresses,
        "role": Role.AGENT,
    }
    values.update(fields)
    return EmailServer(**values)


class FakeDirectory:
    def __init__(self, *servers: EmailServer) -> None:
        self.servers = list(servers)
        self.generation = 0

    def all(self) -> list[EmailServer]:
        return self.servers


def resolver(*servers: EmailServer, **settings: Any) -> Resolver:
    return Resolver(
        Settings(**settings),
        cast(ServerDirectory, FakeDirectory(*servers)),
        cast(Any, None),
        cast(Any, None),
    )


SERVERS = (
    smtp("a", "agent@acme.com", "support@acme.com"),
    smtp("b", "login-b", "sales@acme.com", "support@shop.acme.com"),
    smtp("c", "noreply@acme.com"),
    smtp("d", "x@acme.com", "support@acme.com", tenant="globex"),
    smtp("e", "off@acme.com", enabled=False),
    smtp("t", "templates@acme.com", "alerts@acme.com", role=Role.TEMPLATE, is_template_server=True),
)


@pytest.mark.parametrize(
    ("sender", "server"),
    [
        ("support@acme.com", "a"),
        ("SUPPORT@Acme.Com", "a"),
        ("Support Desk <support@acme.com>", "a"),
        ("sales@acme.com", "b"),
        ("support@shop.acme.com", "b"),
        ("noreply@acme.com", "c"),
        ("agent@acme.com", "a"),
    ],
)
def test_from_picks_the_server_that_owns_the_address(sender: str, server: str) -> None:
    assert resolver(*SERVERS).resolve(cmd(**{"from": sender})).server.id == server


@pytest.mark.parametrize(
    "sender", ["login-b@acme.com", "off@acme.com", "x@acme.com", "alerts@acme.com"]
)
def test_no_match_is_a_clear_failure(sender: str) -> None:
    with pytest.raises(NoRoute, match=re.escape(f"no SMTP server for sender {sender}")):
        resolver(*SERVERS).resolve(cmd(**{"from": sender}))


def test_an_address_on_two_servers_is_ambiguous() -> None:
    twice = (smtp("a", "a@acme.com", "x@acme.com"), smtp("b", "b@acme.com", "x@acme.com"))
    with pytest.raises(NoRoute, match=r"several SMTP servers may send as x@acme\.com"):
        resolver(*twice).resolve(cmd(**{"from": "x@acme.com"}))


def test_a_route_follows_the_servers_the_directory_applied() -> None:
    directory = FakeDirectory(smtp("a", "agent@acme.com", "support@acme.com"))
    routes = Resolver(
        Settings(), cast(ServerDirectory, directory), cast(Any, None), cast(Any, None)
    )
    assert routes.resolve(cmd(**{"from": "support@acme.com"})).server.id == "a"
    directory.servers = [smtp("b", "desk@acme.com", "support@acme.com")]
    directory.generation += 1
    assert routes.resolve(cmd(**{"from": "support@acme.com"})).server.id == "b"
    directory.servers = []
    directory.generation += 1
    with pytest.raises(NoRoute):
        routes.resolve(cmd(**{"from": "support@acme.com"}))


def test_a_route_is_found_once_while_no_server_changes() -> None:
    routes = resolver(*SERVERS)
    first = routes.resolve(cmd(**{"from": "support@acme.com"}))
    assert routes.resolve(cmd(**{"from": "support@acme.com"})) is first


class _InboundRows:
    """A pool whose connection answers ``inbound_messages.find`` from a dict."""

    def __init__(self, mailbox_of: dict[str, str]) -> None:
        self.mailbox_of = mailbox_of

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        yield self

    def execute(self, query: str, params: tuple[str, str]) -> Any:
        tenant_id, message_id = params
        mailbox = self.mailbox_of.get(message_id)
        row = None
        if mailbox is not None:
            row = {
                "tenant_id": tenant_id,
                "message_id": message_id,
                "server_id": "imap-1",
                "mailbox": mailbox,
                "routing_plan_id": "plan",
            }
        return types.SimpleNamespace(fetchone=lambda: row)


def test_replies_without_from_each_leave_from_the_address_their_mail_was_sent_to() -> None:
    rows = _InboundRows({"m1@x": "support@acme.com", "m2@x": "sales@acme.com"})
    routes = Resolver(
        Settings(), cast(ServerDirectory, FakeDirectory(*SERVERS)), cast(Any, rows), cast(Any, None)
    )
    assert routes.resolve(cmd(in_reply_to="<m1@x>")).server.id == "a"
    assert routes.resolve(cmd(in_reply_to="<m2@x>")).server.id == "b"  # not the first's route
    assert routes.resolve(cmd(in_reply_to="<m1@x>")).server.id == "a"


def test_template_uses_the_designated_server_or_the_default() -> None:
    route = resolver(*SERVERS).resolve(cmd(kind="template"))
    assert route.server.id == "t" and route.from_mailbox == "templates@acme.com"
    route = resolver(*SERVERS).resolve(cmd(kind="template", **{"from": "alerts@acme.com"}))
    assert route.from_mailbox == "alerts@acme.com"
    with pytest.raises(NoRoute):
        resolver(*SERVERS).resolve(cmd(kind="template", **{"from": "support@acme.com"}))
    without = [s for s in SERVERS if s.id != "t"]
    with pytest.raises(NoRoute, match="no system default SMTP server"):
        resolver(*without).resolve(cmd(kind="template"))
    route = resolver(
        *without, default_smtp_host="mail.example.net", default_smtp_from="noreply@example.net"
    ).resolve(cmd(kind="template"))
    assert route.system_default and route.server_id is None
    assert route.from_mailbox == "noreply@example.net"


# --- acks -----------------------------------------------------------------------------------


class _FakeChannel:
    def __init__(self) -> None:
        self.acked: list[tuple[int, bool]] = []

    def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self.acked.append((delivery_tag, multiple))


class _FakeMessage:
    def __init__(self, channel: _FakeChannel, tag: int) -> None:
        self.channel = channel
        self.delivery_tag = tag
        self.delivery_info: dict[str, Any] = {"redelivered": False}
        self.requeued = False

    def ack(self) -> None:
        self.channel.basic_ack(self.delivery_tag)

    def requeue(self) -> None:
        self.requeued = True


def test_commands_done_in_a_row_are_acked_at_once_and_never_past_one_still_at_work() -> None:
    """One ``multiple`` ack for commands done in a row; none over one still at work."""
    from services.sender.acks import HELD_LIMIT, Acks

    channel = _FakeChannel()
    acks = Acks()
    messages = [_FakeMessage(channel, tag) for tag in range(1, 6)]
    for message in messages:
        acks.received(cast(Any, message))
    acks.done(cast(Any, messages[1]), True)
    acks.done(cast(Any, messages[0]), True)
    acks.done(cast(Any, messages[2]), False)
    acks.done(cast(Any, messages[4]), True)
    acks.settle()
    # 1 and 2 in one frame; 3 requeued; 5 waits behind 4, which is still at work.
    assert channel.acked == [(2, True)]
    assert messages[2].requeued
    acks.done(cast(Any, messages[3]), True)
    acks.settle()
    assert channel.acked == [(2, True), (5, True)]
    assert acks.pending == 0

    # Behind a slow command, at most HELD_LIMIT wait; then they are acked one by one.
    channel.acked.clear()
    slow = _FakeMessage(channel, 100)
    acks.received(cast(Any, slow))
    others = [_FakeMessage(channel, 101 + n) for n in range(HELD_LIMIT + 1)]
    for message in others:
        acks.received(cast(Any, message))
        acks.done(cast(Any, message), True)
    acks.settle()
    assert sorted(channel.acked) == [(m.delivery_tag, False) for m in others]
    acks.done(cast(Any, slow), True)
    acks.settle()
    assert channel.acked[-1] == (100, True)
