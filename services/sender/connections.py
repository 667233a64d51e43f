"""Reused SMTP connections: at most N per server and process, closed when idle or outdated.

A connection is keyed by the server's id and version: after an admin edits the server, new
sends open new connections with the new settings, and the old ones are closed. A reused
connection that the server closed meanwhile (servers drop idle sessions) is replaced once,
transparently, as long as nothing was handed over yet (before DATA).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shared.contracts.status_reports import FailureCategory
from shared.email_servers import EmailServer
from shared.mail.smtp import SmtpError, SmtpSession, open_session, send_transaction

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


class SmtpConnections:
    def __init__(
        self,
        *,
        per_server: int,
        idle_seconds: float,
        timeout: float,
        ca_bundle: Path | None,
    ) -> None:
        self._per_server = max(1, per_server)
        self._idle_seconds = idle_seconds
        self._timeout = timeout
        self._ca_bundle = ca_bundle
        self._lock = threading.Lock()
        self._servers: dict[str, _ServerConnections] = {}
        self.opened = 0  # connections opened in this process (tests and benchmark read it)

    def send(
        self,
        server: EmailServer,
        password: str | None,
        envelope_from: str,
        recipients: list[str],
        data: bytes,
        *,
        before_mail: Callable[[], None] | None = None,
        before_data: Callable[[], None] | None = None,
        before_wait: Callable[[], None] | None = None,
        smtputf8: bool = False,
    ) -> tuple[int, str]:
        """One transaction on a pooled connection; raises :class:`SmtpError`.

        ``before_mail`` runs before MAIL FROM (again if a stale connection is replaced),
        ``before_data`` just before DATA, ``before_wait`` before anything that may take long:
        waiting for a free connection, or opening one.
        """
        entry = self._entry(server)
        if not entry.slots.acquire(blocking=False):
            if before_wait is not None:
                before_wait()
            entry.slots.acquire()
        try:
            for attempt in (1, 2):
                session, reused = self._take(entry, password, before_wait)
                data_started = False

                def mark() -> None:
                    nonlocal data_started
                    data_started = True
                    if before_data is not None:
                        before_data()

                if smtputf8 and not session.smtputf8:
                    self._give_back(entry, session)
                    raise SmtpError(
                        FailureCategory.PROTOCOL,
                        f"{server.host} does not offer SMTPUTF8, which an address of this "
                        "mail needs (a non-ASCII local part)",
                        temporary=False,
                    )
                try:
                    reply = send_transaction(
                        session,
                        envelope_from,
                        recipients,
                        data,
                        before_mail=before_mail,
                        before_data=mark,
                        smtputf8=smtputf8,
                    )
                except SmtpError as exc:
                    dropped = exc.code is None or exc.code < 0
                    if dropped:
                        session.client.close()
                    else:
                        self._give_back(entry, session)
                    stale = dropped and reused and not data_started
                    if stale and attempt == 1 and exc.category is FailureCategory.NETWORK:
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

    def _entry(self, server: EmailServer) -> _ServerConnections:
        with self._lock:
            entry = self._servers.get(server.id)
            if entry is None or entry.server.version != server.version:
                if entry is not None:
                    self._close_all(entry)
                entry = _ServerConnections(server, threading.BoundedSemaphore(self._per_server))
                self._servers[server.id] = entry
            return entry

    def _take(
        self,
        entry: _ServerConnections,
        password: str | None,
        before_wait: Callable[[], None] | None,
    ) -> tuple[SmtpSession, bool]:
        with self._lock:
            idle = entry.idle.pop() if entry.idle else None
        if idle is not None:
            return idle.session, True
        if before_wait is not None:
            before_wait()
        session = open_session(
            entry.server, password, timeout=self._timeout, ca_bundle=self._ca_bundle
        )
        self.opened += 1
        return session, False

    def _give_back(self, entry: _ServerConnections, session: SmtpSession) -> None:
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
