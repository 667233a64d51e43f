"""Polls one IMAP mailbox: new mail by UID, pushed by IDLE, handed over, then marked read.

New mail is what lies above the mailbox's checkpoint (the highest UID handed over), not what
is unread: a mail someone read in their mail client before Mailroom fetched it is still handed
over. On the first visit, and after the folder's UIDVALIDITY changed (the server renumbered
it), the unread mails are taken instead: after a hand-over every mail is marked ``\\Seen``.
With IDLE the server announces new mail at once; IDLE is renewed every few minutes, well
before servers drop it (29 minutes). Without IDLE the folder is polled (REQUIREMENTS: 60 s).
"""

from __future__ import annotations

import time

from services.fetcher.batching import in_batches
from services.fetcher.handover import InFlight
from services.fetcher.inbound_mail import FetchedMail
from services.fetcher.mailbox_poller import MailboxPoller
from shared.db import fetch_state
from shared.db.fetch_state import Batch, Checkpoint
from shared.email_servers import DEFAULT_INBOX_FOLDER
from shared.mail.imap import ImapMailbox

IDLE_CHECK_SECONDS = 1.0
RECHECK_SECONDS = 0.3


class ImapPoller(MailboxPoller):
    def serve(self) -> None:
        settings = self.context.settings
        mailbox = ImapMailbox(self.server, self.login_secret(), self.context.connector)
        mailbox.open()
        try:
            self._finish_earlier_batches(mailbox)
            while self.keep_going():
                self.check_consent()
                started = time.monotonic()
                fetched = self.fetch_new(mailbox)
                self.report_ok(fetched, time.monotonic() - started)
                if mailbox.supports_idle:
                    # After a hand-over, look once more soon: a mail delivered while the last
                    # one was handed over may not be announced in IDLE (Dovecot only re-checks
                    # every 30 s when the delivery came just before its watch was set up).
                    self._idle(mailbox, RECHECK_SECONDS if fetched else None)
                else:
                    self.pause(settings.imap_poll_seconds)
        finally:
            mailbox.close()

    def _finish_earlier_batches(self, mailbox: ImapMailbox) -> None:
        state = mailbox.state
        for batch in self.handover.recover():
            here = (mailbox.folder, state.uidvalidity) if state is not None else None
            if (batch.folder, batch.uidvalidity) == here:
                mailbox.mark_seen([int(i["key"].removeprefix("uid:")) for i in batch.items])
            self.handover.finish(batch)

    def _idle(self, mailbox: ImapMailbox, seconds: float | None = None) -> None:
        renew = self.context.settings.imap_idle_renew_seconds
        deadline = time.monotonic() + (renew if seconds is None else seconds)
        with mailbox.idling() as watch:
            while self.keep_going() and time.monotonic() < deadline:
                if watch.news(IDLE_CHECK_SECONDS):
                    return

    def fetch_new(self, mailbox: ImapMailbox) -> int:
        """Hand over every new mail of the folder; returns how many."""
        state = mailbox.select()
        folder = self.server.inbox_folder or DEFAULT_INBOX_FOLDER
        with self.context.pool.connection() as conn:
            point = fetch_state.checkpoint(conn, self.server.id)
        if point is not None and (point.folder, point.uidvalidity) == (folder, state.uidvalidity):
            uids = mailbox.uids_after(point.last_uid)
        else:
            uids = mailbox.unseen_uids()  # first visit, or the server renumbered the folder
            if not uids:
                self._start_checkpoint(folder, state.uidvalidity, (state.uidnext or 1) - 1)
        handed_over = 0
        sizes = mailbox.sizes(uids) if uids else {}
        pairs = sorted(sizes.items())
        # The broker is kept busy: while it commits one batch, the poller flags the batch
        # before it and reads the next. Between two batches the broker waits only for the one
        # transaction that records the last as committed and writes the next as pending. Only
        # one batch is ever pending; a flagged batch is closed with the next transaction.
        in_flight: tuple[InFlight, list[tuple[int, int]]] | None = None
        flagged: Batch | None = None
        try:
            for batch in in_batches(pairs, lambda pair: pair[1], self.context.settings):
                if not self.keep_going():
                    break
                mails = self._read(mailbox, batch)
                self.confirm_lease()
                if in_flight is None:
                    in_flight = (self.handover.start(mails, folder, state.uidvalidity), batch)
                    continue
                (settling, settling_uids), in_flight = in_flight, None  # ended below
                committed, following = self.handover.start_next(
                    settling, mails, folder, state.uidvalidity, closing=flagged
                )
                in_flight, flagged = (following, batch), None
                self._flag(mailbox, settling_uids)
                flagged = committed
                handed_over += len(committed.items)
            if in_flight is not None:
                (settling, settling_uids), in_flight = in_flight, None
                committed = self.handover.complete(settling, closing=flagged)
                flagged = None
                self._flag(mailbox, settling_uids)
                flagged = committed
                handed_over += len(committed.items)
        finally:
            if in_flight is not None:
                self.handover.settle_quietly(in_flight[0])
        if flagged is not None:
            # After a failure a flagged batch stays open instead, and is flagged again
            # (harmlessly) when the mailbox's next session recovers it.
            self.handover.finish(flagged)
        return handed_over

    def _flag(self, mailbox: ImapMailbox, batch: list[tuple[int, int]]) -> None:
        """Step 4 for a committed batch: read, and too large ones flagged for a person."""
        mailbox.mark_seen([uid for uid, _ in batch])
        mailbox.mark_flagged([uid for uid, size in batch if self._too_large(size)])

    def _start_checkpoint(self, folder: str, uidvalidity: int, last_uid: int) -> None:
        with self.context.pool.connection() as conn:
            fetch_state.set_checkpoint(
                conn, self.server.id, Checkpoint(folder, uidvalidity, last_uid)
            )

    def _too_large(self, size: int) -> bool:
        return size > self.context.settings.max_mail_bytes

    def _read(self, mailbox: ImapMailbox, batch: list[tuple[int, int]]) -> list[FetchedMail]:
        limit = self.context.settings.max_mail_bytes
        small = {uid: size for uid, size in batch if size <= limit}
        large = [uid for uid, size in batch if size > limit]
        bodies = mailbox.bodies(small) if small else {}
        heads = mailbox.headers(large) if large else {}
        mails = []
        for uid, size in batch:
            if uid in bodies:
                mails.append(FetchedMail(f"uid:{uid}", size, bodies[uid]))
            elif uid in heads:
                reason = (
                    f"mail of {size} bytes exceeds the limit of {limit} bytes; it stays on the "
                    f"server, flagged, in folder {mailbox.folder!r} (UID {uid})"
                )
                mails.append(FetchedMail(f"uid:{uid}", size, heads[uid], quarantine_reason=reason))
            # a UID the server no longer has (expunged meanwhile) is simply gone
        return mails
