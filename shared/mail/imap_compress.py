"""COMPRESS=DEFLATE (RFC 4978) for an imaplib connection, which imaplib itself lacks.

After the server's OK to ``COMPRESS DEFLATE`` both directions are raw deflate streams (zlib
wbits -15). The server's side is inflated by the connection's guarded reader, which counts the
inflated bytes against the answer's limit (a deflate bomb stops there). Every write is
sync-flushed so the server can act on each command at once; imaplib's ``send`` is replaced on
the instance, so imaplib and imapclient above it (IDLE included) keep working unchanged.
"""

from __future__ import annotations

import imaplib
import zlib
from types import MethodType

from shared.mail.guarded_socket import GuardedReader, guard_of


def enable_deflate(imap: imaplib.IMAP4) -> None:
    """Ask for COMPRESS DEFLATE and, on OK, switch the connection's I/O to deflate."""
    typ, data = imap.xatom("COMPRESS", "DEFLATE")
    if typ != "OK":
        raise imaplib.IMAP4.error(f"COMPRESS DEFLATE refused: {data!r}")
    reader = imap.file
    if not isinstance(reader, GuardedReader):
        raise TypeError("COMPRESS needs a connection opened by shared.mail.connector")
    reader.inflate()
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)

    def send(self: imaplib.IMAP4, data: bytes) -> None:
        self.sock.sendall(compressor.compress(bytes(data)) + compressor.flush(zlib.Z_SYNC_FLUSH))
        guard_of(self.sock).expecting(bytes(data[:64]))  # name the command, not its deflate

    imap.send = MethodType(send, imap)  # type: ignore[method-assign]
