"""Polls one POP3 mailbox: new mail handed over, then deleted (REQUIREMENTS: every 20 s).

POP3 has no flags, so the UIDLs of handed-over mails are remembered. Each poll is one session:
RETR, hand over, DELE, and QUIT makes the deletions real. A session that drops before QUIT
leaves the mails on the server; the next session sees their UIDLs and deletes them without
handing them over again. A mail above the size limit is quarantined and kept on the server.
"""

from __future__ import annotations

import time

from services.fetcher.batching import in_batches
from services.fetcher.inbound_mail import FetchedMail
from services.fetcher.mailbox_poller import MailboxPoller
from shared.db import fetch_state
from shared.mail.pop3 import Pop3Mailbox, Pop3Message


class Pop3Poller(MailboxPoller):
    def serve(self) -> None:
        while self.keep_going():
            started = time.monotonic()
            fetched = self.poll_once()
            self.report_ok(fetched, time.monotonic() - started)
            self.pause(self.context.settings.pop3_poll_seconds)

    def poll_once(self) -> int:
        mailbox = Pop3Mailbox(self.server, self.login_secret(), self.context.connector)
        mailbox.open()
        try:
            self.handover.recover()
            listing = mailbox.listing()
            with self.context.pool.connection() as conn:
                fetch_state.forget_uidls_not_in(conn, self.server.id, [m.uidl for m in listing])
                delivered = fetch_state.delivered_uidls(conn, self.server.id)
            for message in listing:
                if delivered.get(message.uidl) is False:  # handed over; deletion was lost
                    mailbox.delete(message.number)
            fresh = [m for m in listing if m.uidl not in delivered]
            handed_over = 0
            for batch in in_batches(fresh, lambda m: m.size, self.context.settings):
                if not self.keep_going():
                    break
                mails = [self._read(mailbox, message) for message in batch]
                self.confirm_lease()
                self.handover.deliver(mails)
                for message, mail in zip(batch, mails, strict=True):
                    if mail.quarantine_reason is None:
                        mailbox.delete(message.number)
                handed_over += len(mails)
            mailbox.commit()
            return handed_over
        finally:
            mailbox.close()

    def _read(self, mailbox: Pop3Mailbox, message: Pop3Message) -> FetchedMail:
        limit = self.context.settings.max_mail_bytes
        key = f"uidl:{message.uidl}"
        if message.size <= limit:
            return FetchedMail(key, message.size, mailbox.retrieve(message.number))
        reason = (
            f"mail of {message.size} bytes exceeds the limit of {limit} bytes; it stays on the "
            f"server (UIDL {message.uidl})"
        )
        return FetchedMail(key, message.size, mailbox.header(message.number), reason)
