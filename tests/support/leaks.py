"""Proof that no password leaves Mailroom: every test password carries one marker.

The suite records every log record, every API answer and every config event it sees; at the
end of the session none of them may contain the marker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

SECRET_MARKER = "Sesam-oeffne-dich"  # ASCII: the lab's stdlib clients log in with LOGIN


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
        found = [f"log: {line[:200]}" for line in self.logs if SECRET_MARKER in line]
        found += [f"API answer: {text[:200]}" for text in self.answers if SECRET_MARKER in text]
        marker = SECRET_MARKER.encode()
        found += [f"event: {body[:200]!r}" for body in self.events if marker in body]
        return found
