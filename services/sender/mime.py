"""The mail of a send command, built with ``email.message.EmailMessage`` and a strict policy.

- Serialised with ``email.policy.SMTP`` (CRLF line ends: aiosmtpd and real servers reject bare
  LF), or ``SMTPUTF8`` when an address needs it and the server offers SMTPUTF8; non-ASCII text
  as 8-bit for a server that offers 8BITMIME, else quoted-printable or base64.
- Subjects and display names may be any Unicode (RFC 2047 encoded words on the wire);
  internationalised domains go out in their IDNA (``xn--``) form.
- ``text`` and ``html`` become a multipart/alternative; attachments are added after them.
- ``Message-ID`` is derived from the request (the same on every attempt, so a receiver that
  de-duplicates by Message-ID helps too); ``In-Reply-To`` and ``References`` from
  ``in_reply_to``; ``Bcc`` recipients are only in the envelope, never in a header.
- Header injection is refused twice: :class:`~shared.contracts.send.SendCommand` refuses CR/LF
  (raw or encoded), and ``EmailMessage`` refuses line breaks in any header value.
"""

from __future__ import annotations

import email.policy
import functools
import uuid
from dataclasses import dataclass
from email.headerregistry import Address, BaseHeader, HeaderRegistry
from email.message import EmailMessage
from email.utils import format_datetime, formatdate, parsedate_to_datetime

from shared.contracts.send import SendCommand, parseaddr
from shared.db.inbound_messages import normalise_message_id
from shared.hostnames import to_ascii

MESSAGE_ID_NAMESPACE = uuid.UUID("6d61696c-726f-6f6d-7365-6e6465720000")


class MimeError(ValueError):
    """The command's content cannot become a mail (a final failure)."""


class _HeaderClasses(HeaderRegistry):
    """The standard header registry, keeping the classes it makes.

    ``HeaderRegistry`` builds a new class for every header it is asked for, which was an
    eighth of the time a mail took to build. Same classes, same rules, made once.
    """

    def __init__(self) -> None:
        super().__init__()
        self._made: dict[str, type[BaseHeader]] = {}

    def __getitem__(self, name: str) -> type[BaseHeader]:
        key = name.lower()
        made = self._made.get(key)
        if made is None:
            made = self._made[key] = super().__getitem__(name)
        return made


_HEADERS = _HeaderClasses()
SMTP_POLICY = email.policy.SMTP.clone(header_factory=_HEADERS)
SMTPUTF8_POLICY = email.policy.SMTPUTF8.clone(header_factory=_HEADERS)
SEVEN_BIT_POLICY = SMTP_POLICY.clone(cte_type="7bit")


@functools.lru_cache(maxsize=4096)
def _ascii_domain(domain: str) -> str:
    """IDNA is slow and mails go to the same few domains: remembered (errors are not)."""
    return to_ascii(domain)


@dataclass(frozen=True)
class BuiltMail:
    data: bytes
    envelope_from: str
    recipients: list[str]
    message_id: str
    smtputf8: bool

    @property
    def eight_bit(self) -> bool:
        """Whether the data has bytes above 127: sent with BODY=8BITMIME (or SMTPUTF8)."""
        return not self.data.isascii()


def to_address(mailbox: str) -> Address:
    """``Name <local@domäin>`` → an Address with the domain in IDNA form."""
    name, address = parseaddr(mailbox)
    local, _, domain = address.rpartition("@")
    try:
        ascii_domain = _ascii_domain(domain)
    except ValueError as exc:
        raise MimeError(f"{address!r}: the domain is not a valid host name") from exc
    return Address(display_name=name, username=local, domain=ascii_domain)


def bare(address: Address) -> str:
    return f"{address.username}@{address.domain}"


def message_id_for(tenant_id: str, request_id: str, from_domain: str) -> str:
    token = uuid.uuid5(MESSAGE_ID_NAMESPACE, f"{tenant_id}\n{request_id}")
    return f"<{token}@{from_domain}>"


def _date() -> str:
    """The Date header's value, as ``DateHeader`` renders ``formatdate(usegmt=True)``."""
    return format_datetime(parsedate_to_datetime(formatdate(usegmt=True)))


def build(
    command: SendCommand,
    from_mailbox: str,
    *,
    allow_smtputf8: bool = False,
    eight_bit: bool = True,
) -> BuiltMail:
    """The mail as bytes for DATA, plus the envelope; raises :class:`MimeError`.

    ``eight_bit``: non-ASCII text may go as 8-bit (the server offers 8BITMIME, and the mail is
    then sent with ``BODY=8BITMIME``); else it is quoted-printable or base64."""
    sender = to_address(from_mailbox)
    to = [to_address(m) for m in command.to]
    cc = [to_address(m) for m in command.cc]
    bcc = [to_address(m) for m in command.bcc]
    every = [sender, *to, *cc, *bcc]
    smtputf8 = any(not bare(a).isascii() for a in every)
    if smtputf8 and not allow_smtputf8:
        raise MimeError("an address has a non-ASCII local part and the server lacks SMTPUTF8")
    policy = SMTPUTF8_POLICY if smtputf8 else SMTP_POLICY if eight_bit else SEVEN_BIT_POLICY
    message_id = message_id_for(command.tenant_id, command.request_id, sender.domain)
    return _built(
        _standard_data(command, policy, sender, to, cc, message_id),
        sender,
        to,
        cc,
        bcc,
        message_id,
        smtputf8,
    )


def _standard_data(
    command: SendCommand,
    policy: email.policy.EmailPolicy[EmailMessage],
    sender: Address,
    to: list[Address],
    cc: list[Address],
    message_id: str,
) -> bytes:
    """Any mail, built with ``EmailMessage``."""
    msg = EmailMessage(policy=policy)
    try:
        msg["From"] = sender
        if to:
            msg["To"] = to
        if cc:
            msg["Cc"] = cc
        if command.reply_to:
            msg["Reply-To"] = to_address(command.reply_to)
        msg["Subject"] = command.subject
        msg["Date"] = _date()
        msg["Message-ID"] = message_id
        if command.in_reply_to:
            parent = f"<{normalise_message_id(command.in_reply_to)}>"
            msg["In-Reply-To"] = parent
            msg["References"] = parent
        for name, value in command.headers.items():
            msg[name] = value
        if command.text is not None and command.html is not None:
            msg.set_content(command.text)
            msg.add_alternative(command.html, subtype="html")
        elif command.html is not None:
            msg.set_content(command.html, subtype="html")
        else:
            msg.set_content(command.text or "")
        for attachment in command.attachments:
            maintype, _, subtype = attachment.content_type.partition("/")
            msg.add_attachment(
                attachment.content(),
                maintype=maintype.strip().lower(),
                subtype=subtype.split(";")[0].strip().lower(),
                filename=attachment.filename,
            )
        return msg.as_bytes(policy=policy)
    except (ValueError, TypeError, LookupError) as exc:
        raise MimeError(f"the mail cannot be built: {exc}") from exc


def _built(
    data: bytes,
    sender: Address,
    to: list[Address],
    cc: list[Address],
    bcc: list[Address],
    message_id: str,
    smtputf8: bool,
) -> BuiltMail:
    recipients: dict[str, str] = {}
    for address in (*to, *cc, *bcc):
        recipients.setdefault(bare(address).lower(), bare(address))
    return BuiltMail(
        data=data,
        envelope_from=bare(sender),
        recipients=list(recipients.values()),
        message_id=message_id,
        smtputf8=smtputf8,
    )
