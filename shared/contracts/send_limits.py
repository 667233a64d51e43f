"""How large a send command may be, checked before the sender holds it twice.

A command is any client's JSON (CONTRACT.md), so its size is the client's choice. Each limit is
a setting (``MAILROOM_SEND_MAX_*``, :class:`~shared.settings.Settings`), and a command over one
is an invalid command: a final ``failed`` result whose reason names the limit and its setting,
and the command in ``mailroom.send.dead``. The checks cost as little as the refusal allows:

- the body's length is checked before it is decoded or parsed (:func:`too_large`); the ids of
  such a command are looked for only in its first ``PEEK_BYTES`` (:func:`peek_ids`);
- the rest is checked on the parsed JSON before the command is validated (:func:`over_limits`),
  counting lists before looking into them, and an attachment's decoded size is computed from
  its base64 text, which is never decoded for the check (:func:`decoded_size`);
- a refused command never reaches the sender's delivery, so no mail is built for it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.settings import Settings

MIB = 1024 * 1024
PEEK_BYTES = 64 * 1024  # of a body too large to parse, where its ids are looked for
_SHOWN_NAME_CHARS = 60  # of a header's name in a reason
_PIECE = 64 * 1024  # characters encoded at a time to measure a text

# The setting behind each limit, named in reasons (``MAILROOM_`` + the Settings field).
SETTING_OF = {
    "command_bytes": "MAILROOM_SEND_MAX_COMMAND_BYTES",
    "attachments": "MAILROOM_SEND_MAX_ATTACHMENTS",
    "attachment_bytes": "MAILROOM_SEND_MAX_ATTACHMENT_BYTES",
    "recipients": "MAILROOM_SEND_MAX_RECIPIENTS",
    "headers": "MAILROOM_SEND_MAX_HEADERS",
    "header_bytes": "MAILROOM_SEND_MAX_HEADER_BYTES",
}


@dataclass(frozen=True)
class SendLimits:
    """The limits of one sender; the defaults are the settings' defaults."""

    command_bytes: int = 32 * MIB
    attachments: int = 50
    attachment_bytes: int = 20 * MIB
    recipients: int = 500
    headers: int = 50
    header_bytes: int = 2048

    @classmethod
    def from_settings(cls, settings: Settings) -> SendLimits:
        return cls(
            command_bytes=settings.send_max_command_bytes,
            attachments=settings.send_max_attachments,
            attachment_bytes=settings.send_max_attachment_bytes,
            recipients=settings.send_max_recipients,
            headers=settings.send_max_headers,
            header_bytes=settings.send_max_header_bytes,
        )


DEFAULT_LIMITS = SendLimits()


def _reason(says: str, limit: str, limits: SendLimits) -> str:
    allowed: int = getattr(limits, limit)
    are = "is" if allowed == 1 else "are"
    return f"{says}; at most {allowed:,} {are} allowed ({SETTING_OF[limit]})"


def too_large(length: int, limits: SendLimits) -> str | None:
    """The reason a body of ``length`` bytes is refused before it is parsed, if it is."""
    if length <= limits.command_bytes:
        return None
    return _reason(f"the command is {length:,} bytes", "command_bytes", limits)


def decoded_size(data_base64: str) -> int:
    """The bytes that ``data_base64`` decodes to, without decoding it (nor copying it).

    Exact for valid base64 with ASCII white space anywhere (``b64decode`` ignores it); other
    text gets a size that invalid base64 is refused for anyway.
    """
    significant = len(data_base64) - sum(data_base64.count(ch) for ch in " \t\r\n\v\f")
    tail = data_base64[-16:].rstrip()
    padding = min(2, len(tail) - len(tail.rstrip("=")))
    return max(0, significant * 3 // 4 - padding)


def over_limits(data: dict[str, Any], limits: SendLimits) -> list[str]:
    """What a parsed command exceeds, one reason per limit (none: within every limit).

    Fields of the wrong type are left to the command's validation, which names them. Each
    list is counted before it is looked into, so a command with a million headers costs no
    more than one with as many as allowed.
    """
    problems: list[str] = []
    lists = [data.get(field) for field in ("to", "cc", "bcc")]
    recipients = sum(len(value) for value in lists if isinstance(value, list))
    if recipients > limits.recipients:
        says = f"the command has {recipients:,} recipients"
        problems.append(_reason(says, "recipients", limits))
    attachments = data.get("attachments")
    if isinstance(attachments, list):
        problems += _attachment_problems(attachments, limits)
    headers = data.get("headers")
    if isinstance(headers, dict):
        problems += _header_problems(headers, limits)
    return problems


def _attachment_problems(attachments: list[Any], limits: SendLimits) -> list[str]:
    if len(attachments) > limits.attachments:
        says = f"the command has {len(attachments):,} attachments"
        return [_reason(says, "attachments", limits)]
    problems = []
    for number, attachment in enumerate(attachments):
        data = attachment.get("data_base64") if isinstance(attachment, dict) else None
        if not isinstance(data, str):
            continue
        size = decoded_size(data)
        if size > limits.attachment_bytes:
            says = f"attachments.{number} is {size:,} bytes (decoded)"
            problems.append(_reason(says, "attachment_bytes", limits))
    return problems


def _header_problems(headers: dict[str, Any], limits: SendLimits) -> list[str]:
    if len(headers) > limits.headers:
        says = f"the command has {len(headers):,} headers"
        return [_reason(says, "headers", limits)]
    problems = []
    for name, value in headers.items():
        size = utf8_length(name) + (utf8_length(value) if isinstance(value, str) else 0)
        if size > limits.header_bytes:
            says = f"the header {_shown(name)} is {size:,} bytes (name and value)"
            problems.append(_reason(says, "header_bytes", limits))
    return problems


def utf8_length(text: str) -> int:
    """Bytes in UTF-8, encoded a piece at a time (a header may be most of the command)."""
    if text.isascii():
        return len(text)
    return sum(
        len(text[start : start + _PIECE].encode("utf-8", "surrogatepass"))
        for start in range(0, len(text), _PIECE)
    )


def _shown(name: str) -> str:
    shown = name if len(name) <= _SHOWN_NAME_CHARS else name[:_SHOWN_NAME_CHARS] + "…"
    return repr(shown)


# One JSON token: a whole string, or one structural character. A string cut off by the end
# of the peeked bytes matches as no token, which ends the look.
_TOKEN = re.compile(r'\s*(?:("[^"\\]*(?:\\.[^"\\]*)*")|([{}\[\]:,])|([^\s{}\[\]:,"]+))', re.S)


def peek_ids(body: bytes | bytearray) -> tuple[str | None, str | None]:
    """``request_id`` and ``tenant_id`` of a JSON object too large to parse, when its first
    ``PEEK_BYTES`` hold them as top-level string fields (clients write them first)."""
    text = body[:PEEK_BYTES].decode("utf-8", "replace")
    found: dict[str, str] = {}
    depth = 0
    key: str | None = None
    expect_value = False
    position = 0
    while len(found) < 2:
        token = _TOKEN.match(text, position)
        if token is None:
            break
        position = token.end()
        string, structure = token.group(1), token.group(2)
        if structure in ("{", "["):
            depth += 1
            expect_value = False
        elif structure in ("}", "]"):
            depth -= 1
            if depth <= 0:
                break
        elif structure == ":":
            expect_value = depth == 1 and key is not None
            continue
        elif string is not None and depth == 1:
            if expect_value and key in ("request_id", "tenant_id"):
                found.setdefault(key, _decoded_string(string))
            key = None if expect_value else _decoded_string(string)
            expect_value = False
            continue
        key, expect_value = None, False
    return found.get("request_id"), found.get("tenant_id")


def _decoded_string(token: str) -> str:
    try:
        value = json.loads(token)
    except ValueError:
        return ""
    return value if isinstance(value, str) else ""
