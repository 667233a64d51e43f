"""Any body on ``mailroom.send``: the command parser and the MIME builder, fuzzed (hypothesis).

The parser answers any bytes with a command or an :class:`InvalidCommand` that a result and a
dead letter can carry; an accepted command is within every limit, and builds a mail (or a
:class:`MimeError`, a reason) that Python's email parser reads back with the same recipients,
subject and attachments. Runs are derandomised and bounded, so ``make test`` takes the same
few seconds each time; a failure prints the example that caused it.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import json
import string
import tracemalloc
from email.message import EmailMessage
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from services.sender.mime import MimeError, build, to_address
from shared.contracts.send import (
    ID_MAX_CHARS,
    TEXT_MAX_CHARS,
    InvalidCommand,
    SendCommand,
    SendResult,
    parse_command,
)
from shared.contracts.send_limits import SETTING_OF, SendLimits, decoded_size

# Small limits, so that generated commands fall on both sides of each.
LIMITS = SendLimits(
    command_bytes=16 * 1024,
    attachments=2,
    attachment_bytes=300,
    recipients=4,
    headers=3,
    header_bytes=80,
)
FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- what a client may publish ------------------------------------------------------------

any_text = st.text(st.characters(codec=None), max_size=30)  # every code point, lone surrogates too
huge_numbers = st.one_of(
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
)
json_values = st.recursive(
    st.none() | st.booleans() | huge_numbers | any_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=12,
)

# Text for a header: any code point a client can send as UTF-8 (the contract refuses line
# breaks of every kind), with the characters that mean something in a header now and then.
header_text = st.text(
    st.one_of(
        st.characters(codec="utf-8", exclude_characters="\r\n"),
        st.sampled_from('\t \x7f\x1c\x1d\x1e\x85\u2028\u2029\x0b\x0c"\\()<>[],;:@=?_.'),
    ),
    max_size=40,
)
body_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=200)
words = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=8)
valid_local_parts = st.one_of(
    st.text(string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-.", min_size=1, max_size=12),
    st.text(st.characters(codec="utf-8", categories=["L", "N"]), min_size=1, max_size=8),
)
local_parts = st.one_of(valid_local_parts, any_text)
valid_domains = st.one_of(
    st.builds(
        lambda labels, top: ".".join([*labels, top]),
        st.lists(words, min_size=1, max_size=2),
        st.sampled_from(["org", "com", "test"]),
    ),
    st.sampled_from(["bücher.example", "例え.テスト", "xn--bcher-kva.example", "a.b.c.d.e.f.org"]),
)
domains = st.one_of(
    valid_domains, st.sampled_from(["a..b", "-x.org", "a_b.org", "x" * 64 + ".org"])
)
mailboxes = st.builds(
    lambda name, local, domain: f"{name} <{local}@{domain}>" if name else f"{local}@{domain}",
    st.one_of(st.just(""), header_text, st.text(string.printable, max_size=20)),
    local_parts,
    domains,
)
header_names = st.one_of(
    words.map(lambda word: f"X-{word}"),
    st.sampled_from(["Bcc", "List-Unsubscribe", "Bad Name", "X-" + "a" * 90]),
)
base64_texts = st.one_of(
    st.binary(max_size=400).map(lambda data: base64.b64encode(data).decode()),
    st.binary(max_size=400).map(lambda data: base64.encodebytes(data).decode()),  # with \n
    st.text(string.ascii_letters + "+/= \r\n*", max_size=40),
)
attachments = st.fixed_dictionaries(
    {
        "filename": st.one_of(st.just("report.pdf"), header_text, any_text),
        "content_type": st.sampled_from(["application/pdf", "text/plain", "x/y", "a/b c", "x"]),
        "data_base64": base64_texts,
    }
)
# Each field of a command, with values of its type, most of them valid.
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "request_id": st.one_of(st.uuids().map(str), any_text),
    "tenant_id": st.just("acme"),
    "kind": st.sampled_from(["agent", "template", "other"]),
    "from": st.one_of(st.none(), mailboxes),
    "to": st.lists(mailboxes, max_size=3),
    "cc": st.lists(mailboxes, max_size=2),
    "bcc": st.lists(mailboxes, min_size=1, max_size=1),
    "reply_to": st.one_of(st.none(), mailboxes),
    "subject": st.one_of(header_text, any_text),
    "text": st.one_of(st.none(), body_text),
    "html": st.one_of(st.none(), body_text),
    "headers": st.dictionaries(header_names, st.one_of(header_text, any_text), max_size=4),
    "attachments": st.lists(attachments, max_size=3),
    "in_reply_to": st.one_of(st.none(), header_text),
}
# ... and only valid ones: what the MIME builder mostly gets.
valid_mailboxes = st.builds(
    lambda name, local, domain: f"{name} <{local}@{domain}>" if name else f"{local}@{domain}",
    st.one_of(st.just(""), header_text),
    valid_local_parts,
    valid_domains,
)
VALID_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    **FIELDS,
    "request_id": st.uuids().map(str),
    "kind": st.sampled_from(["agent", "template"]),
    "from": valid_mailboxes,
    "to": st.lists(valid_mailboxes, max_size=2),
    "cc": st.lists(valid_mailboxes, max_size=1),
    "bcc": st.lists(valid_mailboxes, min_size=1, max_size=1),
    "reply_to": valid_mailboxes,
    "subject": header_text,
    "headers": st.dictionaries(words.map(lambda word: f"X-{word}"), header_text, max_size=3),
    "attachments": st.lists(
        st.fixed_dictionaries(
            {
                "filename": header_text.filter(bool),
                "content_type": st.sampled_from(["application/pdf", "text/plain", "x/y"]),
                "data_base64": st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode()),
            }
        ),
        max_size=2,
    ),
}
_ALWAYS = ("request_id", "tenant_id", "bcc")


@st.composite
def commands(draw: st.DrawFn, *, valid: bool = False) -> dict[str, Any]:
    """A command as a client might publish it: any of its fields, now and then one of them
    any JSON value at all; or (``valid``) each field valid on its own."""
    fields = VALID_FIELDS if valid else FIELDS
    present = draw(st.sets(st.sampled_from(sorted(fields))))
    document = {
        key: draw(fields[key]) for key in sorted(fields) if key in present or key in _ALWAYS
    }
    if not valid and draw(st.integers(0, 4)) == 0:
        document[draw(st.sampled_from(sorted(fields)))] = draw(json_values)
    return document


def published(ascii_only: bool, document: Any) -> bytes:
    """The JSON a client would publish: escaped ASCII, or raw UTF-8 (where a lone surrogate
    makes bytes that are not UTF-8 at all)."""
    return json.dumps(document, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


# --- what must hold for every answer ------------------------------------------------------


def parse(body: bytes | str) -> SendCommand | InvalidCommand:
    """The parser's answer; any exception but InvalidCommand fails the test."""
    try:
        command, raw = parse_command(body, LIMITS)
    except InvalidCommand as invalid:
        assert_answerable(invalid)
        return invalid
    assert isinstance(raw, dict)
    return command


def assert_answerable(invalid: InvalidCommand) -> None:
    """A result and a dead letter's headers can carry the answer: UTF-8, and short."""
    assert len(invalid.reason) <= TEXT_MAX_CHARS + 1
    for value in (invalid.request_id, invalid.tenant_id):
        assert value is None or len(value) <= ID_MAX_CHARS + 1
    for value in (invalid.reason, invalid.request_id or "", invalid.tenant_id or ""):
        value.encode("utf-8")
    result = SendResult(
        request_id=invalid.request_id,
        tenant_id=invalid.tenant_id,
        status="failed",
        reason=invalid.reason,
    )
    result.model_dump_json()


def exceeded(document: dict[str, Any]) -> set[str]:
    """The limits a command exceeds, worked out here by decoding what the sender does not."""
    over = set()
    lists = [document.get(field) for field in ("to", "cc", "bcc")]
    if sum(len(value) for value in lists if isinstance(value, list)) > LIMITS.recipients:
        over.add("recipients")
    files = document.get("attachments")
    if isinstance(files, list) and len(files) > LIMITS.attachments:
        over.add("attachments")
    elif isinstance(files, list):
        for file in files:
            data = file.get("data_base64") if isinstance(file, dict) else None
            if isinstance(data, str) and _decodes_to(data) > LIMITS.attachment_bytes:
                over.add("attachment_bytes")
    headers = document.get("headers")
    if isinstance(headers, dict) and len(headers) > LIMITS.headers:
        over.add("headers")
    elif isinstance(headers, dict):
        for name, value in headers.items():
            text = name + (value if isinstance(value, str) else "")
            if len(text.encode("utf-8", "surrogatepass")) > LIMITS.header_bytes:
                over.add("header_bytes")
    return over


def _is_utf8(body: bytes) -> bool:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _decodes_to(data: str) -> int:
    try:
        return len(base64.b64decode("".join(data.split()), validate=True))
    except (binascii.Error, ValueError):
        return decoded_size(data)  # not base64: refused either way, the size says for which


# --- the parser ---------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=2000))
def test_any_bytes_are_a_command_or_an_answerable_refusal(body: bytes) -> None:
    parse(body)


@FUZZ
@given(json_values, st.booleans())
def test_any_json_is_refused_with_an_answerable_reason(document: Any, ascii_only: bool) -> None:
    """No recipient, so never a command; as bytes or as text (which may hold raw surrogates)."""
    assert isinstance(parse(published(ascii_only, document)), InvalidCommand)
    assert isinstance(parse(json.dumps(document, ensure_ascii=False)), InvalidCommand)


@FUZZ
@given(st.integers(min_value=1, max_value=5000), st.sampled_from(["[", '{"a":', '{"to":[{"x":']))
def test_deep_nesting_is_refused_with_a_reason(depth: int, opening: str) -> None:
    closing = "".join({"[": "]", "{": "}"}[ch] for ch in reversed(opening) if ch in "[{")
    for body in ((opening * depth).encode(), (opening * depth + "1" + closing * depth).encode()):
        assert isinstance(parse(body), InvalidCommand)


@FUZZ
@given(commands(), st.booleans())
def test_a_command_is_accepted_only_within_every_limit(
    document: dict[str, Any], ascii_only: bool
) -> None:
    body = published(ascii_only, document)
    answer = parse(body)
    if len(body) > LIMITS.command_bytes:
        over = {"command_bytes"}
    elif _is_utf8(body):
        over = exceeded(document)
    else:
        over = set()  # not JSON, whatever it holds
    if isinstance(answer, InvalidCommand):
        for limit in over:
            assert SETTING_OF[limit] in answer.reason, (limit, answer.reason)
        return
    assert not over, over
    command = answer
    assert len(command.to) + len(command.cc) + len(command.bcc) <= LIMITS.recipients
    assert len(command.attachments) <= LIMITS.attachments
    for attachment in command.attachments:
        assert decoded_size(attachment.data_base64) == len(attachment.content())
        assert len(attachment.content()) <= LIMITS.attachment_bytes
    assert len(command.headers) <= LIMITS.headers


@FUZZ
@given(st.integers(min_value=1, max_value=200_000), st.binary(max_size=64))
def test_a_body_over_the_size_limit_is_refused_before_it_is_parsed(extra: int, junk: bytes) -> None:
    """Not JSON at all, yet the answer is about its size (it was never parsed), and names the
    request it starts with."""
    start = b'{"request_id": "big-1", "tenant_id": "acme", "text": "'
    body = start + junk + b"x" * (LIMITS.command_bytes + extra)
    answer = parse(body)
    assert isinstance(answer, InvalidCommand)
    assert answer.reason.startswith(f"the command is {len(body):,} bytes;")
    assert answer.reason.endswith("(MAILROOM_SEND_MAX_COMMAND_BYTES)")
    assert (answer.request_id, answer.tenant_id) == ("big-1", "acme")


# --- the MIME builder ---------------------------------------------------------------------


def _addresses(header: Any) -> list[tuple[str, str, str]]:
    return (
        [] if header is None else [(a.display_name, a.username, a.domain) for a in header.addresses]
    )


def _expected(mailboxes: list[str]) -> list[tuple[str, str, str]]:
    addresses = [to_address(mailbox) for mailbox in mailboxes]
    return [(a.display_name, a.username, a.domain) for a in addresses]


@FUZZ
@given(st.one_of(commands(valid=True), commands()), st.booleans())
@example(  # found by this test: a line break to str.splitlines, and so to the email package
    {"request_id": "r", "tenant_id": "acme", "to": ["a@example.org"], "subject": "a\x1cb"}, True
)
def test_every_accepted_command_builds_a_mail_that_reads_back_the_same(
    document: dict[str, Any], ascii_only: bool
) -> None:
    answer = parse(published(ascii_only, document))
    if isinstance(answer, InvalidCommand):
        return
    command = answer
    try:
        mail = build(
            command, command.from_ or "Support <support@acme.example>", allow_smtputf8=True
        )
    except MimeError as refused:
        # The one thing the contract leaves to the builder: IDNA's rules for a domain.
        assert str(refused).endswith("the domain is not a valid host name"), refused
        return
    assert all(len(line) <= 998 for line in mail.data.split(b"\r\n")), "a line SMTP refuses"
    assert b"\n" not in mail.data.replace(b"\r\n", b"")
    message = email.message_from_bytes(mail.data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    assert not message.defects, message.defects
    header_block = mail.data.split(b"\r\n\r\n", 1)[0]
    assert mail.smtputf8 or header_block.isascii()
    # Python's parser reads 8-bit headers as unknown bytes; SMTPUTF8 headers are UTF-8.
    head = email.message_from_string(header_block.decode("utf-8"), policy=email.policy.default)
    assert head["Subject"] == command.subject
    assert _addresses(head["To"]) == _expected(command.to)
    assert _addresses(head["Cc"]) == _expected(command.cc)
    assert "Bcc" not in head
    every = _expected([*command.to, *command.cc, *command.bcc])
    assert {r.lower() for r in mail.recipients} == {f"{u}@{d}".lower() for _, u, d in every}
    files = [part.get_payload(decode=True) for part in message.iter_attachments()]
    assert files == [attachment.content() for attachment in command.attachments]


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 299, 300, 301, 10_000])
def test_decoded_size_is_exact_for_valid_base64_with_white_space(size: int) -> None:
    data = (bytes(range(256)) * 40)[:size]
    for text in (base64.b64encode(data).decode(), base64.encodebytes(data).decode()):
        assert decoded_size(text) == size
        assert decoded_size(" " + text.replace("\n", "\r\n\t")) == size


# --- the limits, case by case -------------------------------------------------------------


def _command(**fields: Any) -> dict[str, Any]:
    return {"request_id": "r-1", "tenant_id": "acme", "to": ["a@example.org"], **fields}


def _refusal(document: dict[str, Any], limits: SendLimits | None = None) -> InvalidCommand:
    with pytest.raises(InvalidCommand) as caught:
        if limits is None:
            parse_command(json.dumps(document).encode())
        else:
            parse_command(json.dumps(document).encode(), limits)
    assert (caught.value.request_id, caught.value.tenant_id) == ("r-1", "acme")
    return caught.value


def test_each_limit_is_named_with_its_setting_in_the_reason() -> None:
    many = [f"r{n}@example.org" for n in range(1200)]
    assert _refusal(_command(to=many)).reason == (
        "the command has 1,200 recipients; at most 500 are allowed (MAILROOM_SEND_MAX_RECIPIENTS)"
    )
    file = {"filename": "a.pdf", "data_base64": base64.b64encode(b"x" * 301).decode()}
    assert _refusal(_command(attachments=[file] * 3), LIMITS).reason == (
        "the command has 3 attachments; at most 2 are allowed (MAILROOM_SEND_MAX_ATTACHMENTS)"
    )
    assert _refusal(_command(attachments=[file]), LIMITS).reason == (
        "attachments.0 is 301 bytes (decoded); at most 300 are allowed"
        " (MAILROOM_SEND_MAX_ATTACHMENT_BYTES)"
    )
    headers = {f"X-{n}": "v" for n in range(4)}
    assert _refusal(_command(headers=headers), LIMITS).reason == (
        "the command has 4 headers; at most 3 are allowed (MAILROOM_SEND_MAX_HEADERS)"
    )
    assert _refusal(_command(headers={"X-Long": "é" * 38}), LIMITS).reason == (
        "the header 'X-Long' is 82 bytes (name and value); at most 80 are allowed"
        " (MAILROOM_SEND_MAX_HEADER_BYTES)"
    )
    both = _refusal(_command(cc=many[:4], headers=headers), LIMITS).reason
    assert "MAILROOM_SEND_MAX_RECIPIENTS" in both and "MAILROOM_SEND_MAX_HEADERS" in both


def test_a_command_at_every_limit_is_accepted() -> None:
    data = base64.encodebytes(b"x" * 300).decode()  # with line breaks, as MIME tools write it
    command, _ = parse_command(
        json.dumps(
            _command(
                to=["a@example.org", "b@example.org"],
                cc=["c@example.org"],
                bcc=["d@example.org"],
                headers={"X-1": "v", "X-2": "v", "X-Long": "é" * 37},
                attachments=[{"filename": "a", "data_base64": data}] * 2,
            )
        ).encode(),
        LIMITS,
    )
    assert len(command.recipients) == 4 and len(command.attachments) == 2


def test_every_reason_names_a_setting_that_exists_with_the_limits_default() -> None:
    from shared.settings import Settings

    fields = Settings.model_fields
    for limit, setting in SETTING_OF.items():
        field = setting.removeprefix("MAILROOM_").lower()
        assert field in fields, setting
        assert fields[field].description, setting
        assert fields[field].default == getattr(SendLimits(), limit)
    assert SendLimits.from_settings(Settings()) == SendLimits()


def test_a_body_over_the_size_limit_costs_no_copy_of_it() -> None:
    """Refused before it is decoded: the sender holds it once, as it came."""
    body = b'{"request_id": "r-1", "tenant_id": "acme", "text": "' + b"x" * (33 * 1024 * 1024)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidCommand) as caught:
            parse_command(body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "MAILROOM_SEND_MAX_COMMAND_BYTES" in caught.value.reason
    assert caught.value.request_id == "r-1"
    assert peak < 1024 * 1024, f"{peak:,} bytes allocated to refuse it"


def test_an_attachment_over_its_limit_is_never_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("an attachment was decoded")

    monkeypatch.setattr(base64, "b64decode", no_decoding)
    monkeypatch.setattr(binascii, "a2b_base64", no_decoding)
    file = {"filename": "big.bin", "data_base64": "QUJD" * 101}  # 303 bytes
    assert (
        "MAILROOM_SEND_MAX_ATTACHMENT_BYTES"
        in _refusal(_command(attachments=[file]), LIMITS).reason
    )


@pytest.mark.parametrize(
    ("start", "ids"),
    [
        (b'{"request_id": "r-1", "tenant_id": "acme", "text": "', ("r-1", "acme")),
        (b'{"tenant_id":"acme","request_id":"r\\u00e9-\\"1\\""', ('ré-"1"', "acme")),
        (
            b'{"headers": {"request_id": "nested"}, "to": ["request_id"], "request_id": "top"',
            ("top", None),
        ),
        (b'{"text": "request_id\\": \\"inside a string", "request_id": "r-2"', ("r-2", None)),
        (b'{"request_id": 42, "tenant_id": ["acme"]', (None, None)),
        (b'["request_id", "r-1"]', (None, None)),
        (b'\xff\xfe{"request_id": "r-1"', ("r-1", None)),
        (b'{"text": "' + b"x" * 70_000 + b'", "request_id": "too-late"', (None, None)),
        (b'{"request_id": "r\\ud800"', ("r?", None)),
    ],
)
def test_the_ids_of_a_command_too_large_to_parse_come_from_its_top_level(
    start: bytes, ids: tuple[str | None, str | None]
) -> None:
    with pytest.raises(InvalidCommand) as caught:
        parse_command(start + b" " * LIMITS.command_bytes, LIMITS)
    assert (caught.value.request_id, caught.value.tenant_id) == ids


def test_a_huge_id_or_reason_is_cut_to_what_a_result_and_a_header_carry() -> None:
    huge = "r" * 300_000
    invalid = _refusal_of({"request_id": huge, "tenant_id": "acme", "to": [huge + "@"]})
    assert invalid.request_id == "r" * ID_MAX_CHARS + "…"
    assert len(invalid.reason) == TEXT_MAX_CHARS + 1 and invalid.reason.endswith("…")
    invalid = _refusal_of({"request_id": "r-1", "tenant_id": "\udc00" * 300, "to": []})
    assert invalid.tenant_id == "?" * ID_MAX_CHARS + "…"
    result = SendResult(
        request_id=huge, tenant_id="acme", status="failed", reason=huge, smtp_response=huge
    )
    wire = json.loads(result.model_dump_json())
    assert len(wire["request_id"]) == ID_MAX_CHARS + 1
    assert len(wire["reason"]) == len(wire["smtp_response"]) == TEXT_MAX_CHARS + 1


def _refusal_of(document: dict[str, Any]) -> InvalidCommand:
    with pytest.raises(InvalidCommand) as caught:
        parse_command(json.dumps(document).encode())
    return caught.value
