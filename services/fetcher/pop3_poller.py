"""Polls one POP3 mailbox: new mail handed over, then deleted (REQUIREMENTS: every 20 s).

POP3 has no flags, so the UIDLs of handed-over mails are remembered. Each poll is one session:
RETR, hand over, DELE, and QUIT makes the deletions real. A session that drops before QUIT
leaves the mails on the server; the next session sees their UIDLs and deletes them without
handing them over again. A mail above the size limit is quarantined and kept on the server.

A mail whose RETR the client has to cut off (the server sends more than it LISTed, or takes
longer than the answer's time limit) spoils the session, since the rest of its answer is still
on the wire. The mails read before it are
handed over, the mail is remembered as hostile, and a new session starts at once: it
quarantines that mail with its header block (``TOP n 0``), or with none when that too is cut
off, and goes on with the mails after it. The memory of such mails is the poller's; a
fetcher that starts afresh finds them again the same way.
"""

from __future__ import annotations

import logging
import time

from services.fetcher.batching import in_batches
from services.fetcher.inbound_mail import FetchedMail
from services.fetcher.mailbox_poller import FetcherContext, MailboxPoller
from shared.db import fetch_state
from shared.email_servers import EmailServer
from shared.mail.guarded_socket import AnswerTooLarge
from shared.mail.pop3 import Pop3Mailbox, Pop3Message

log = logging.getLogger(__name__)


class _SessionSpoilt(Exception):
    """A mail's answer was cut off; the connection cannot be used any further."""


class Pop3Poller(MailboxPoller):
    def __init__(
        self,
        server: EmailServer,
        context: FetcherContext,
        predecessor: MailboxPoller | None = None,
    ) -> None:
        super().__init__(server, context, predecessor)
        self._hostile: dict[str, str] = {}  # UIDL → why it is quarantined instead of read
        self._headless: set[str] = set()  # UIDLs of hostile mails whose TOP was cut off too

    def serve(self) -> None:
        while self.keep_going():
            started = time.monotonic()
            fetched = self.poll_once()
            self.report_ok(fetched, time.monotonic() - started)
            self.pause(self.context.settings.pop3_poll_seconds)

    def poll_once(self) -> int:
        """One poll: sessions until one ends well (each spoilt one makes a mail known)."""
        handed_over = 0
        while True:
            fetched, spoilt = self._session()
            handed_over += fetched
            if not spoilt or self.stopping:
                return handed_over

    def _session(self) -> tuple[int, bool]:
        """Hand over what is new; returns how many, and whether a mail spoilt the session."""
        mailbox = Pop3Mailbox(self.server, self.login_secret(), self.context.connector)
        mailbox.open()
        key = self.handover.state_key
        try:
            self.handover.recover()
            listing = mailbox.listing()
            with self.context.pool.connection() as conn:
                fetch_state.forget_uidls_not_in(conn, key, [m.uidl for m in listing])
                delivered = fetch_state.delivered_uidls(conn, key)
            for message in listing:
                if delivered.get(message.uidl) is False:  # handed over; deletion was lost
                    mailbox.delete(message.number)
            fresh = [m for m in listing if m.uidl not in delivered]
            handed_over = 0
            for batch in in_batches(fresh, lambda m: m.size, self.context.settings):
                if not self.keep_going():
                    break
                mails: list[FetchedMail] = []
                try:
                    for message in batch:
                        mails.append(self._read(mailbox, message))
                except _SessionSpoilt:
                    if mails:
                        self.confirm_lease()
                        self.handover.deliver(mails)  # deleted by the next session
                    return handed_over + len(mails), True
                self.confirm_lease()
                self.handover.deliver(mails)
                for message, mail in zip(batch, mails, strict=True):
                    if mail.quarantine_reason is None:
                        mailbox.delete(message.number)
                handed_over += len(mails)
            mailbox.commit()
            return handed_over, False
        finally:
            mailbox.close()

    def _read(self, mailbox: Pop3Mailbox, message: Pop3Message) -> FetchedMail:
        limit = self.context.settings.max_mail_bytes
        key = f"uidl:{message.uidl}"
        hostile = self._hostile.get(message.uidl)
        if hostile is None and message.size <= limit:
            try:
                return FetchedMail(key, message.size, mailbox.retrieve(message.number))
            except AnswerTooLarge as cut_off:
                self._remember(message, f"{cut_off.reason}; it stays on the server")
                raise _SessionSpoilt from cut_off
        if hostile is None:
            hostile = (
                f"mail of {message.size} bytes exceeds the limit of {limit} bytes; it stays on "
                "the server"
            )
        reason = f"{hostile} (UIDL {message.uidl})"
        if message.uidl in self._headless:
            return FetchedMail(key, message.size, b"", reason)
        try:
            return FetchedMail(key, message.size, mailbox.header(message.number), reason)
        except AnswerTooLarge as cut_off:
            self._remember(message, f"{hostile}; its header block too: {cut_off.reason}")
            self._headless.add(message.uidl)
            raise _SessionSpoilt from cut_off

    def _remember(self, message: Pop3Message, reason: str) -> None:
        log.warning("%s: mail %s spoilt the session: %s", self.name, message.uidl, reason)
        self._hostile[message.uidl] = reason
