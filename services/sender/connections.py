"""Reused SMTP connections: at most N per server and process, closed when idle or outdated.

A connection is keyed by the server's id and version: after an admin edits the server, new
sends open new connections with the new settings, and the old ones are closed. A send waits
for a free connection of its server at most ``slot_wait_seconds`` (then it fails as temporary:
the request is retried later), so a thread never waits long for a server others keep busy.

A reused connection that the server closed meanwhile (servers drop idle sessions), or that
it answers with 421 (closing: RFC 5321 3.8), is replaced once at once, as long as nothing was
handed over yet (before the mail's final ``.``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from shared.contracts.status_reports import FailureCategory
from shared.email_servers import EmailServer
from shared.mail.connector import Connector
from shared.mail.smtp import Handover, SmtpError, SmtpSession, open_session, send_transaction

log = logging.getLogger(__name__)


@dataclass
class _Idle:
    session: SmtpSession
    since: float


@dataclass
class _ServerConnections:
    server: EmailServer
    slots: threading.BoundedSemaphore
    idle: list[_Idle] = field(default_factory=list)


class SevenBitOnly(Exception):
    """The server takes no 8-bit mail (no 8BITMIME): the mail must be built 7-bit."""


class SmtpConnections:
    def __init__(
        self,
        *,
        per_server: int,
        idle_seconds: float,
        connector: Connector,
        slot_wait_seconds: float = 10.0,
    ) -> None:
        self._per_server = max(1, per_server)
        self._idle_seconds = idle_seconds
        self._connector = connector
        self._slot_wait = slot_wait_seconds
        self._lock = threading.Lock()
        self._servers: dict[str, _ServerConnections] = {}
        self.opened = 0  # connections opened in this process (the tests read it)

    def send(
        self,
        server: EmailServer,
        password: str | None,
        envelope_from: str,
        recipients: list[str],
        data: bytes,
        *,
        handover: Handover | None = None,
        smtputf8: bool = False,
    ) -> tuple[int, str]:
        """One transaction on a pooled connection; raises :class:`SmtpError`, or
        :class:`SevenBitOnly` for an 8-bit mail to a server without 8BITMIME. The
        ``handover`` is made while the server answers MAIL FROM (again if a stale connection
        is replaced)."""
        entry = self._entry(server)
        if not entry.slots.acquire(timeout=self._slot_wait):
            raise SmtpError(
                FailureCategory.INTERNAL,
                f"every connection to {server.host} was busy for {self._slot_wait:g} s",
                temporary=True,
            )
        try:
            for attempt in (1, 2):
                session, reused = self._take(entry, password)
                self._check_extensions(entry, session, data, smtputf8)
                try:
                    reply = send_transaction(
                        session,
                        envelope_from,
                        recipients,
                        data,
                        handover=handover,
                        smtputf8=smtputf8,
                    )
                except SmtpError as exc:
                    dropped = exc.code is None or exc.code < 0 or exc.code == 421
                    if dropped:
                        session.client.close()
                    else:
                        self._give_back(entry, session)
                    stale = dropped and reused and not exc.handed_over
                    if stale and attempt == 1:
                        log.debug("SMTP connection to %s was closed; opening a new one", server.id)
                        continue
                    raise
                except BaseException:
                    session.client.close()
                    raise
                self._give_back(entry, session)
                return reply
            raise AssertionError("unreachable")
        finally:
            entry.slots.release()

    def _check_extensions(
        self, entry: _ServerConnections, session: SmtpSession, data: bytes, smtputf8: bool
    ) -> None:
        if smtputf8 and not session.smtputf8:
            self._give_back(entry, session)
            raise SmtpError(
                FailureCategory.PROTOCOL,
                f"{entry.server.host} does not offer SMTPUTF8, which an address of this mail "
                "needs (a non-ASCII local part)",
                temporary=False,
            )
        if not data.isascii() and not session.eight_bit:
            self._give_back(entry, session)
            raise SevenBitOnly(entry.server.host)

    def _entry(self, server: EmailServer) -> _ServerConnections:
        with self._lock:
            entry = self._servers.get(server.id)
            if entry is None or entry.server.version != server.version:
                if entry is not None:
                    self._close_all(entry)
                entry = _ServerConnections(server, threading.BoundedSemaphore(self._per_server))
                self._servers[server.id] = entry
            return entry

    def _take(self, entry: _ServerConnections, password: str | None) -> tuple[SmtpSession, bool]:
        with self._lock:
            idle = entry.idle.pop() if entry.idle else None
        if idle is not None:
            return idle.session, True
        session = open_session(entry.server, password, self._connector)
        self.opened += 1
        return session, False

    def _give_back(self, entry: _ServerConnections, session: SmtpSession) -> None:
        if session.closed:
            return  # lost, or cut off by its last transaction (shared.mail.smtp): not reusable
        with self._lock:
            if self._servers.get(entry.server.id) is entry:
                entry.idle.append(_Idle(session, time.monotonic()))
                return
        session.close()  # the server changed meanwhile: this connection is outdated

    def forget(self, server_id: str) -> None:
        """The server changed or went away: close its idle connections."""
        with self._lock:
            entry = self._servers.pop(server_id, None)
        if entry is not None:
            self._close_all(entry)

    def close_idle(self) -> None:
        """Close connections unused for ``idle_seconds`` (called about once a second)."""
        now = time.monotonic()
        expired: list[SmtpSession] = []
        with self._lock:
            for entry in self._servers.values():
                keep = [i for i in entry.idle if now - i.since < self._idle_seconds]
                expired += [i.session for i in entry.idle if now - i.since >= self._idle_seconds]
                entry.idle = keep
        for session in expired:
            session.close()

    def close(self) -> None:
        with self._lock:
            entries = list(self._servers.values())
            self._servers.clear()
        for entry in entries:
            self._close_all(entry)

    def _close_all(self, entry: _ServerConnections) -> None:
        idle, entry.idle = entry.idle, []
        for item in idle:
            item.session.close()
