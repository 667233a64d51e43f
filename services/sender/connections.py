"""Reused SMTP connections: at most N per server and process, closed when idle or outdated.

A connection is keyed by the server's id and version: after an admin edits the server, new
sends open new connections with the new settings, and the old ones are closed. A reused
connection that the server closed meanwhile (servers drop idle sessions) is replaced once,
transparently, as long as nothing was handed over yet (before the mail's final ``.``).

A thread that sends several mails in a row keeps its connection between them (a
:class:`Turn`). Handing the connection to another thread after every mail cost about a
millisecond of an otherwise idle connection per mail (the next thread has to wake up and get
Python's GIL from the one that just sent): measured on the wire, the gap between the server's
250 and the next MAIL FROM was 1.3 ms against 0.3 ms in a bare smtplib loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
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


class _Watched:
    """The caller's :class:`Handover`, noting when the mail's final ``.`` may have gone out:
    a connection that breaks after that is not retried on a new one."""

    def __init__(self, handover: Handover | None) -> None:
        self._handover = handover
        self.handing_over = False

    def start(self) -> None:
        if self._handover is not None:
            self._handover.start()

    def ready(self) -> bool:
        return self._handover is None or self._handover.ready()

    def wait(self) -> None:
        self.handing_over = True
        if self._handover is not None:
            self._handover.wait()

    def deciding(self) -> None:
        if self._handover is not None:
            self._handover.deciding()


class Turn:
    """One thread's hold on a pooled connection (and its slot) from one send to the next.

    :meth:`SmtpConnections.send` with a turn keeps the connection after a successful
    transaction; the next send to the same server goes on without giving it back. A send to
    another server, a failed transaction or :meth:`release` gives it back. A thread holds at
    most one connection, so two threads can never wait for each other's.
    """

    def __init__(self, connections: SmtpConnections) -> None:
        self._connections = connections
        self._entry: _ServerConnections | None = None
        self._session: SmtpSession | None = None

    def _take(self, entry: _ServerConnections) -> SmtpSession | None:
        """The held connection if it is ``entry``'s (its slot passes to the caller)."""
        if self._entry is entry and self._session is not None:
            session, self._entry, self._session = self._session, None, None
            return session
        self.release()
        return None

    def _hold(self, entry: _ServerConnections, session: SmtpSession) -> None:
        self._entry, self._session = entry, session

    def release(self) -> None:
        entry, session, self._entry, self._session = self._entry, self._session, None, None
        if entry is not None and session is not None:
            self._connections._give_back(entry, session)
            entry.slots.release()


class SmtpConnections:
    def __init__(
        self,
        *,
        per_server: int,
        idle_seconds: float,
        connector: Connector,
    ) -> None:
        self._per_server = max(1, per_server)
        self._idle_seconds = idle_seconds
        self._connector = connector
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
        handover: Handover | None = None,
        before_wait: Callable[[], None] | None = None,
        smtputf8: bool = False,
        turn: Turn | None = None,
    ) -> tuple[int, str]:
        """One transaction on a pooled connection; raises :class:`SmtpError`.

        The ``handover`` starts while the server answers MAIL FROM (again if a stale
        connection is replaced) and is awaited before the mail's final ``.`` (from then on the
        server may accept it); ``before_wait`` runs before anything that may take long:
        waiting for a free connection, or opening one. With a ``turn``, the connection stays
        with it after a success (see :class:`Turn`).
        """
        entry = self._entry(server)
        held = turn._take(entry) if turn is not None else None
        if held is None and not entry.slots.acquire(blocking=False):
            if before_wait is not None:
                before_wait()
            entry.slots.acquire()
        kept = False
        try:
            for attempt in (1, 2):
                if held is not None:
                    session, reused, held = held, True, None
                else:
                    session, reused = self._take(entry, password, before_wait)
                watched = _Watched(handover)
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
                        handover=watched,
                        smtputf8=smtputf8,
                    )
                except SmtpError as exc:
                    dropped = exc.code is None or exc.code < 0
                    if dropped:
                        session.client.close()
                    else:
                        self._give_back(entry, session)
                    stale = dropped and reused and not watched.handing_over
                    if stale and attempt == 1 and exc.category is FailureCategory.NETWORK:
                        log.debug("SMTP connection to %s was closed; opening a new one", server.id)
                        continue
                    raise
                except BaseException:
                    session.client.close()
                    raise
                if turn is not None:
                    turn._hold(entry, session)
                    kept = True
                else:
                    self._give_back(entry, session)
                return reply
            raise AssertionError("unreachable")
        finally:
            if not kept:
                entry.slots.release()

    def turn(self) -> Turn:
        return Turn(self)

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
