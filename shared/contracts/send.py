"""Send commands and send results: any service → ``mailroom.send`` → sender → results.

The JSON shapes are part of the contract (CONTRACT.md, AMQP): a command is plain JSON on the
durable queue ``mailroom.send`` (default exchange), published by any AMQP client in any
language; results go to the topic exchange ``mailroom.send.results`` with routing key ``sent``
or ``failed``. :class:`SendCommand` is the one validation of a command: what it refuses is
answered with a ``failed`` result naming the problem and kept in ``mailroom.send.dead``.

Header injection is refused here, before any MIME is built: no value that ends up in a header
(addresses, subject, custom headers, file names, content types, ``in_reply_to``) may hold CR
or LF, neither raw nor hidden in an RFC 2047 encoded word.

A command must also be storable as it came: the sender keeps it in PostgreSQL (``jsonb``) for
its retries, and ``jsonb`` refuses the NUL character and UTF-16 surrogates without their pair,
both valid in JSON (``\\u0000``, ``\\ud800``). Such a string anywhere in the command, even in
a field the sender does not read, makes it invalid (:func:`parse_command`). It is refused at
once, instead of failing the statement that records its first retry.

A command's size is bounded by the sender's limits (:mod:`shared.contracts.send_limits`),
checked by :func:`parse_command` before the command is validated, and its body's length before
it is parsed at all.

What goes back to the client is bounded too, whatever the command or a server said: a reason
or a server's reply in a result or a dead letter's headers is cut to ``TEXT_MAX_CHARS``
characters, an id to ``ID_MAX_CHARS`` (:func:`cut`, marked by ``…``). So a dead letter's header
table stays under 20 KB even in 4-byte UTF-8, far below the 128 KiB of RabbitMQ's
``frame_max`` that bounds it: a publish the broker would refuse (``FRAME_ERROR``, the
connection closed) would requeue the command, and it would come back for ever.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import re
import uuid
from datetime import UTC, datetime
from email.header import decode_header
from email.utils import parseaddr as _parseaddr
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from shared.contracts.send_limits import (
    DEFAULT_LIMITS,
    PEEK_BYTES,
    SendLimits,
    over_limits,
    peek_ids,
    too_large,
    utf8_length,
)

TEXT_MAX_CHARS = 2000  # a reason or a server's reply, in results and dead letters
ID_MAX_CHARS = 255  # request_id and tenant_id (a valid command's are at most this long)


def cut(text: str, limit: int) -> str:
    """``text`` as a result or an AMQP header can carry it: its first ``limit`` characters and
    ``…`` if longer (so a cut id never equals a valid one), a lone surrogate as ``?`` (UTF-8
    cannot encode one: the publish would fail, and the command come again)."""
    short = text if len(text) <= limit else text[:limit] + "…"
    return short if short.isascii() else short.encode("utf-8", "replace").decode("utf-8")


def _cut_or_none(text: str | None, limit: int) -> str | None:
    return None if text is None else cut(text, limit)


# Headers the sender writes itself; a command may not set them through ``headers``.
RESERVED_HEADERS = frozenset(
    {
        "from",
        "sender",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "subject",
        "date",
        "message-id",
        "in-reply-to",
        "references",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "content-disposition",
        "return-path",
        "received",
    }
)
_FIELD_NAME = re.compile(r"^[!-9;-~]{1,76}$")  # RFC 5322 ftext, a sane length
_LOCAL = re.compile(r"^[^\s@<>()\[\],;:\"\\]+$")
_DOMAIN_LABEL = re.compile(r"^[^\s@<>()\[\],;:\"\\.]+$")


# Every line boundary of ``str.splitlines`` (the email package refuses each in a header), and NUL.
_LINE_BREAKS = "\r\n\x00\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def no_line_breaks(value: str) -> str:
    """Refuse CR, LF (and other line separators) raw or inside encoded words."""
    if any(ch in value for ch in _LINE_BREAKS):
        raise ValueError("must not contain line breaks (header injection)")
    if "=?" in value:
        try:
            parts = decode_header(value)
        except (ValueError, LookupError, binascii.Error):
            return value  # not a well-formed encoded word: it stays literal text
        for chunk, _charset in parts:
            text = chunk if isinstance(chunk, str) else chunk.decode("latin-1", "replace")
            if "\r" in text or "\n" in text:
                raise ValueError("must not contain encoded line breaks (header injection)")
    return value


@functools.lru_cache(maxsize=4096)
def parseaddr(value: str) -> tuple[str, str]:
    """``email.utils.parseaddr``, remembered: it is pure, slow, and the same few senders come
    again and again (it was a tenth of the sender's CPU per mail, parsed in the command and
    again in the mail)."""
    return _parseaddr(value)


def mailbox(value: str) -> str:
    """One address, bare (``a@example.org``) or with a display name (``Ann <a@example.org>``)."""
    no_line_breaks(value)
    _name, address = parseaddr(value)
    if not address or address.count("@") != 1:
        raise ValueError(f"{value!r} is not an email address")
    local, _, domain = address.rpartition("@")
    labels = domain.rstrip(".").split(".")
    if not _LOCAL.match(local) or not all(_DOMAIN_LABEL.match(label) for label in labels):
        raise ValueError(f"{value!r} is not an email address")
    return value


def address_of(value: str) -> str:
    """The bare address of a validated mailbox."""
    return parseaddr(value)[1]


HeaderText = Annotated[str, AfterValidator(no_line_breaks)]
Mailbox = Annotated[str, AfterValidator(mailbox)]


class Attachment(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    filename: HeaderText = Field(min_length=1, max_length=255)
    content_type: HeaderText = "application/octet-stream"
    data_base64: str

    @field_validator("content_type")
    @classmethod
    def _type(cls, value: str) -> str:
        maintype, _, subtype = value.partition("/")
        if not maintype or not subtype or not _FIELD_NAME.match(value.replace(" ", "")):
            raise ValueError(f"{value!r} is not a MIME type like application/pdf")
        return value

    @field_validator("data_base64")
    @classmethod
    def _base64(cls, value: str) -> str:
        try:
            base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("is not valid base64") from exc
        return value

    def content(self) -> bytes:
        return base64.b64decode("".join(self.data_base64.split()), validate=True)


class SendCommand(BaseModel):
    """A request to send one mail (queue ``mailroom.send``)."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    request_id: str = Field(min_length=1, max_length=255)
    tenant_id: str = Field(min_length=1, max_length=255)
    kind: Literal["agent", "template"] = "agent"
    from_: Mailbox | None = Field(default=None, alias="from")
    to: list[Mailbox] = Field(default_factory=list)
    cc: list[Mailbox] = Field(default_factory=list)
    bcc: list[Mailbox] = Field(default_factory=list)
    reply_to: Mailbox | None = None
    subject: HeaderText = ""
    text: str | None = None
    html: str | None = None
    headers: dict[str, HeaderText] = Field(default_factory=dict)
    attachments: list[Attachment] = Field(default_factory=list)
    in_reply_to: HeaderText | None = None

    @field_validator("request_id", "tenant_id")
    @classmethod
    def _printable(cls, value: str) -> str:
        no_line_breaks(value)
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("headers")
    @classmethod
    def _header_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _FIELD_NAME.match(name):
                raise ValueError(f"{name!r} is not a header field name")
            if name.lower() in RESERVED_HEADERS:
                raise ValueError(f"{name!r} is set by the sender itself; use the command's field")
        return value

    @model_validator(mode="after")
    def _recipients(self) -> SendCommand:
        count = len(self.to) + len(self.cc) + len(self.bcc)
        if count == 0:
            raise ValueError("no recipient: to, cc and bcc are all empty")
        return self

    @property
    def recipients(self) -> list[str]:
        """Every envelope recipient (to, cc and bcc), bare addresses, each once."""
        seen: dict[str, str] = {}
        for value in (*self.to, *self.cc, *self.bcc):
            address = address_of(value)
            seen.setdefault(address.lower(), address)
        return list(seen.values())


class InvalidCommand(Exception):
    """A command that can never be sent; ``reason`` names the problem for the publisher."""

    def __init__(self, reason: str, request_id: str | None, tenant_id: str | None) -> None:
        super().__init__(reason)
        self.reason = cut(reason, TEXT_MAX_CHARS)
        self.request_id = _cut_or_none(request_id, ID_MAX_CHARS)
        self.tenant_id = _cut_or_none(tenant_id, ID_MAX_CHARS)


# Where JSON can hide a character that jsonb refuses: only an escape writes it (raw UTF-8 cannot
# carry a surrogate, and a raw NUL is not valid JSON), so a body without one needs no walk.
_ESCAPED_UNSTORABLE = re.compile(r"\\u(?:0000|[dD][89abcdefABCDEF])")
_MAX_PLACE = 120  # characters of a field's place in a reason (names are the client's)


def _place(path: str) -> str:
    place = path or "command"
    return place if len(place) <= _MAX_PLACE else place[:_MAX_PLACE] + "…"


def _unstorable(value: Any, path: str = "") -> str | None:
    """The first problem with a string that PostgreSQL cannot store, named by its place."""
    if isinstance(value, str):
        if "\x00" in value:
            return f"{_place(path)}: must not contain NUL characters (\\u0000)"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{_place(path)}: must not contain a lone surrogate (\\ud800-\\udfff)"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            place = f"{path}.{key}" if path else str(key)
            problem = _unstorable(key, f"{path or 'command'} (a field name)") or _unstorable(
                item, place
            )
            if problem:
                return problem
    elif isinstance(value, list):
        for number, item in enumerate(value):
            problem = _unstorable(item, f"{path}.{number}" if path else str(number))
            if problem:
                return problem
    return None


def _number(text: str) -> float:
    """A JSON number that jsonb can store: Python reads ``1e400`` as infinity, jsonb refuses."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large")
    return value


def _constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_float=_number, parse_constant=_constant)  # made once


def _decoded(text: str) -> Any:
    try:
        return _DECODER.decode(text)
    except RecursionError as exc:
        raise ValueError("nested too deeply") from exc


def _identifier(value: Any) -> str | None:
    """An id for the answer to an invalid command: what it came as, as a result can carry it."""
    return cut(value, ID_MAX_CHARS) if isinstance(value, str) else None


class ParsedCommand(NamedTuple):
    command: SendCommand
    raw: dict[str, Any]  # the JSON object as published: what is kept for retries


def parse_command(body: Any, limits: SendLimits = DEFAULT_LIMITS) -> ParsedCommand:
    """The command in an AMQP body (bytes, str or already decoded JSON), and the JSON object it
    came as; raises InvalidCommand. A body over ``limits.command_bytes`` is refused before it
    is decoded, a command over the other limits before it is validated."""
    data: Any = body
    escaped = True  # whether the JSON may hide a string jsonb refuses
    if isinstance(body, bytes | bytearray):
        oversized = too_large(len(body), limits)
        if oversized:
            raise InvalidCommand(oversized, *peek_ids(body))
        try:
            text = bytes(body).decode("utf-8")
            data = _decoded(text)
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidCommand(f"not JSON: {exc}", None, None) from exc
        escaped = _ESCAPED_UNSTORABLE.search(text) is not None
        del text  # while the command is validated: the body and its JSON, no third copy
    elif isinstance(body, str):  # may hold a raw surrogate: always walked
        oversized = too_large(utf8_length(body), limits)
        if oversized:
            start = body[:PEEK_BYTES].encode("utf-8", "replace")
            raise InvalidCommand(oversized, *peek_ids(start))
        try:
            data = _decoded(body)
        except ValueError as exc:
            raise InvalidCommand(f"not JSON: {exc}", None, None) from exc
    if not isinstance(data, dict):
        raise InvalidCommand("not a JSON object", None, None)
    request_id = _identifier(data.get("request_id"))
    tenant_id = _identifier(data.get("tenant_id"))
    exceeded = over_limits(data, limits)
    if exceeded:
        raise InvalidCommand("; ".join(exceeded), request_id, tenant_id)
    try:
        problem = _unstorable(data) if escaped else None
    except RecursionError:
        problem = "command: nested too deeply"
    if problem:
        raise InvalidCommand(f"invalid command: {problem}", request_id, tenant_id)
    try:
        return ParsedCommand(SendCommand.model_validate(data), data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'command'}: {error['msg']}"
            for error in exc.errors(include_url=False, include_input=False)
        )
        raise InvalidCommand(f"invalid command: {problems}", request_id, tenant_id) from exc


SendStatus = Literal["sent", "failed"]


class SendResult(BaseModel):
    """The outcome of one attempt (exchange ``mailroom.send.results``, key = ``status``).

    ``final`` is false while the sender will try again. ``reason`` says why in words an admin
    can read; ``uncertain`` marks the rare delivery whose outcome is unknown (the worker died
    after handing the mail over): it is never sent again, see the sender's docs.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: int = 1
    result_id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    request_id: str | None
    tenant_id: str | None
    status: SendStatus
    email_server_id: str | None = None
    smtp_code: int | None = None
    smtp_response: str | None = None
    attempts: int = 0
    final: bool = True
    reason: str | None = None
    category: str | None = None
    message_id: str | None = None
    from_address: str | None = None
    via_system_default: bool = False
    uncertain: bool = False
    next_attempt_in_seconds: float | None = None
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @field_validator("request_id", "tenant_id")
    @classmethod
    def _short_id(cls, value: str | None) -> str | None:
        return _cut_or_none(value, ID_MAX_CHARS)

    @field_validator("reason", "smtp_response")
    @classmethod
    def _short_text(cls, value: str | None) -> str | None:
        return _cut_or_none(value, TEXT_MAX_CHARS)

    @property
    def routing_key(self) -> str:
        return self.status
