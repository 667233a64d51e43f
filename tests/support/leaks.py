"""Proof that no password leaves Mailroom: every test password carries one marker.

The suite records every log record, every API answer and every config event it sees; at the
end of the session none of them may contain the marker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

SECRET_MARKER = "Sesam-oeffne-dich"  # ASCII: the lab's stdlib clients log in with LOGIN
# Secrets that cannot carry the marker (OAuth2 tokens the lab's provider issued): tests add
# each one they learn of, and the session's check looks for them too.
OTHER_SECRETS: set[str] = set()


def password(suffix: str = "") -> str:
    """A password the leak check will recognise anywhere."""
    return f"{SECRET_MARKER}-{suffix}"


@dataclass
class LeakWatch(logging.Handler):
    logs: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    events: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        logging.Handler.__init__(self, logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def __hash__(self) -> int:
        return id(self)

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        if record.exc_info:
            text += self.formatter.formatException(record.exc_info) if self.formatter else ""
        self.logs.append(text)

    def leaks(self) -> list[str]:
        found: list[str] = []
        for secret in (SECRET_MARKER, *OTHER_SECRETS):
            found += [f"log: {line[:200]}" for line in self.logs if secret in line]
            found += [f"API answer: {text[:200]}" for text in self.answers if secret in text]
            marker = secret.encode()
            found += [f"event: {body[:200]!r}" for body in self.events if marker in body]
        return found
