"""Polls one IMAP mailbox: new mail by UID, pushed by IDLE, handed over, then marked read.

New mail is what lies above the mailbox's checkpoint (the highest UID handed over), not what
is unread: a mail someone read in their mail client before Mailroom fetched it is still handed
over. On the first visit, and after the folder's UIDVALIDITY changed (the server renumbered
it), the unread mails are taken instead: after a hand-over every mail is marked ``\\Seen``.
With IDLE the server announces new mail at once; IDLE is renewed every few minutes, well
before servers drop it (29 minutes). Without IDLE the folder is polled (REQUIREMENTS: 60 s).

No mail is passed over in silence. A UID the server leaves out of an answer (its size, or its
body) is asked for once more on its own; if the server still has it but gives no body, the
mail is quarantined with that reason and flagged, like a mail above the size limit. A FETCH
the guarded socket cuts off (a server that sends more than the sizes it gave) spoils the
session: a new one starts at once, fetches that batch's mails one at a time, and the mail
that is cut off alone is quarantined with its header block (or none, when that too is cut
off). The checkpoint only ever passes mails that were handed over or quarantined, or that the
server no longer has.
"""

from __future__ import annotations

import logging
import time

from services.fetcher.batching import in_batches
from services.fetcher.handover import InFlight, uid_of
from services.fetcher.inbound_mail import FetchedMail
from services.fetcher.mailbox_poller import FetcherContext, MailboxPoller
from shared.db import fetch_state
from shared.db.fetch_state import Batch, Checkpoint
from shared.email_servers import DEFAULT_INBOX_FOLDER, EmailServer
from shared.mail.guarded_socket import AnswerTooLarge
from shared.mail.imap import ImapMailbox

log = logging.getLogger(__name__)

IDLE_CHECK_SECONDS = 1.0
RECHECK_SECONDS = 0.3
NO_SIZE = -1  # the server gave no RFC822.SIZE for the UID

# (UIDVALIDITY, UID): a mail of the poller's folder.
MailRef = tuple[int, int]


class _SessionSpoilt(Exception):
    """An answer was cut off; the connection cannot be used any further."""


class ImapPoller(MailboxPoller):
    def __init__(
        self,
        server: EmailServer,
        context: FetcherContext,
        predecessor: MailboxPoller | None = None,
    ) -> None:
        super().__init__(server, context, predecessor)
        self._suspects: set[MailRef] = set()  # in a batch FETCH that was cut off
        self._hostile: dict[MailRef, str] = {}  # cut off on its own: why it is quarantined
        self._headless: dict[MailRef, str] = {}  # its header block was cut off too: why

    def serve(self) -> None:
        while not self.stopping:
            try:
                self._session()
                return
            except _SessionSpoilt as spoilt:
                log.info("%s: a new session after a cut-off answer: %s", self.name, spoilt)

    def _session(self) -> None:
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
            mine = batch.identity == self.handover.state_key.identity
            if mine and (batch.folder, batch.uidvalidity) == here:
                self._flag(mailbox, batch)
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
            point = fetch_state.checkpoint(conn, self.handover.state_key)
        if point is not None and (point.folder, point.uidvalidity) == (folder, state.uidvalidity):
            uids = mailbox.uids_after(point.last_uid)
        else:
            uids = mailbox.unseen_uids()  # first visit, or the server renumbered the folder
            if not uids:
                self._start_checkpoint(folder, state.uidvalidity, (state.uidnext or 1) - 1)
        handed_over = 0
        pairs = sorted(self._sizes(mailbox, uids).items())
        # The broker is kept busy: while it commits one batch, the poller flags the batch
        # before it and reads the next. Between two batches the broker waits only for the one
        # transaction that records the last as committed and writes the next as pending. Only
        # one batch is ever pending; a flagged batch is closed with the next transaction.
        in_flight: InFlight | None = None
        flagged: Batch | None = None
        try:
            for batch in in_batches(pairs, lambda pair: max(pair[1], 0), self.context.settings):
                if not self.keep_going():
                    break
                mails = self._read(mailbox, batch, state.uidvalidity)
                self.confirm_lease()
                if in_flight is None:
                    in_flight = self.handover.start(mails, folder, state.uidvalidity)
                    continue
                settling, in_flight = in_flight, None  # ended below
                committed, following = self.handover.start_next(
                    settling, mails, folder, state.uidvalidity, closing=flagged
                )
                in_flight, flagged = following, None
                self._flag(mailbox, committed)
                flagged = committed
                handed_over += len(committed.items)
            if in_flight is not None:
                settling, in_flight = in_flight, None
                committed = self.handover.complete(settling, closing=flagged)
                flagged = None
                self._flag(mailbox, committed)
                flagged = committed
                handed_over += len(committed.items)
        finally:
            if in_flight is not None:
                self.handover.settle_quietly(in_flight)
        if flagged is not None:
            # After a failure a flagged batch stays open instead, and is flagged again
            # (harmlessly) when the mailbox's next session recovers it.
            self.handover.finish(flagged)
        return handed_over

    def _sizes(self, mailbox: ImapMailbox, uids: list[int]) -> dict[int, int]:
        """RFC822.SIZE of each UID; one the server leaves out is asked for once more, and
        is kept with :data:`NO_SIZE` while the server still has it."""
        sizes = mailbox.sizes(uids) if uids else {}
        missing = [uid for uid in uids if uid not in sizes]
        if missing:
            sizes.update(mailbox.sizes(missing))
            missing = [uid for uid in missing if uid not in sizes]
        gone = self._gone(mailbox, missing)
        sizes.update({uid: NO_SIZE for uid in missing if uid not in gone})
        return sizes

    def _flag(self, mailbox: ImapMailbox, batch: Batch) -> None:
        """Step 4 for a committed batch: read, and quarantined ones flagged for a person."""
        mailbox.mark_seen([uid_of(item) for item in batch.items])
        mailbox.mark_flagged([uid_of(item) for item in batch.items if item.get("quarantined")])

    def _start_checkpoint(self, folder: str, uidvalidity: int, last_uid: int) -> None:
        with self.context.pool.connection() as conn:
            fetch_state.set_checkpoint(
                conn, self.handover.state_key, Checkpoint(folder, uidvalidity, last_uid)
            )

    def _read(
        self, mailbox: ImapMailbox, batch: list[tuple[int, int]], uidvalidity: int
    ) -> list[FetchedMail]:
        limit = self.context.settings.max_mail_bytes
        whole = {
            uid: size
            for uid, size in batch
            if 0 <= size <= limit and (uidvalidity, uid) not in self._hostile
        }
        bodies = self._bodies(mailbox, whole, uidvalidity)
        for uid in [uid for uid in whole if uid not in bodies]:  # left out: asked once more
            bodies.update(self._bodies(mailbox, {uid: whole[uid]}, uidvalidity))
        without_body = [uid for uid in whole if uid not in bodies]
        gone = self._gone(mailbox, without_body)
        mails = []
        for uid, size in batch:
            if uid in bodies:
                mails.append(FetchedMail(f"uid:{uid}", size, bodies[uid]))
            elif uid in gone:
                log.info("%s: UID %d was expunged before it could be fetched", self.name, uid)
            else:
                why = self._hostile.get((uidvalidity, uid)) or self._why_not_whole(uid, size)
                mails.append(self._quarantined(mailbox, uid, size, uidvalidity, why))
        return mails

    def _why_not_whole(self, uid: int, size: int) -> str:
        limit = self.context.settings.max_mail_bytes
        if size == NO_SIZE:
            return "the server gave no size for this mail"
        if size > limit:
            return f"mail of {size} bytes exceeds the limit of {limit} bytes"
        return "the server answered FETCH for this mail without its body, twice"

    def _bodies(
        self, mailbox: ImapMailbox, sizes: dict[int, int], uidvalidity: int
    ) -> dict[int, bytes]:
        """The bodies of ``sizes``' UIDs; those of a batch once cut off one at a time."""
        if not sizes:
            return {}
        if len(sizes) > 1 and any((uidvalidity, uid) in self._suspects for uid in sizes):
            found: dict[int, bytes] = {}
            for uid, size in sizes.items():
                found.update(self._bodies(mailbox, {uid: size}, uidvalidity))
            return found
        try:
            return mailbox.bodies(sizes)
        except AnswerTooLarge as cut_off:
            if len(sizes) == 1:
                self._hostile[(uidvalidity, next(iter(sizes)))] = cut_off.reason
            else:
                self._suspects.update((uidvalidity, uid) for uid in sizes)
            raise _SessionSpoilt(cut_off.reason) from cut_off

    def _quarantined(
        self, mailbox: ImapMailbox, uid: int, size: int, uidvalidity: int, why: str
    ) -> FetchedMail:
        """The mail's header block (or nothing, once that was cut off) with the reason."""
        where = f"it stays on the server, flagged, in folder {mailbox.folder!r} (UID {uid})"
        ref = (uidvalidity, uid)
        if ref in self._headless:
            reason = f"{why}; its header block too: {self._headless[ref]}; {where}"
            return FetchedMail(f"uid:{uid}", max(size, 0), b"", reason)
        try:
            head = mailbox.headers([uid]).get(uid, b"")
        except AnswerTooLarge as cut_off:
            self._hostile.setdefault(ref, why)
            self._headless[ref] = cut_off.reason
            raise _SessionSpoilt(cut_off.reason) from cut_off
        return FetchedMail(f"uid:{uid}", max(size, 0), head, f"{why}; {where}")

    def _gone(self, mailbox: ImapMailbox, uids: list[int]) -> set[int]:
        """Those of ``uids`` the folder no longer holds (expunged meanwhile)."""
        if not uids:
            return set()
        present = set(mailbox.uids_after(min(uids) - 1))
        return {uid for uid in uids if uid not in present}
