"""COMPRESS=DEFLATE (RFC 4978) for an imaplib connection, which imaplib itself lacks.

After the server's OK to ``COMPRESS DEFLATE`` both directions are raw deflate streams (zlib
wbits -15); every write is sync-flushed so the server can act on each command at once. The
connection's ``read``/``readline``/``send`` are replaced on the instance, so imaplib and
imapclient above it (IDLE included) keep working unchanged.
"""

from __future__ import annotations

import imaplib
import zlib
from types import MethodType

_CHUNK = 65536
_MAX_LINE = 1_000_000  # imaplib's own limit for one line


class DeflateStream:
    def __init__(self, imap: imaplib.IMAP4) -> None:
        self._imap = imap
        self._compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
        self._decompressor = zlib.decompressobj(-15)
        self._buffer = bytearray()

    @property
    def pending(self) -> bool:
        """Inflated input not read yet: a poll of the socket would not show it."""
        return bool(self._buffer)

    def send(self, data: bytes) -> None:
        packed = self._compressor.compress(bytes(data)) + self._compressor.flush(zlib.Z_SYNC_FLUSH)
        self._imap.sock.sendall(packed)

    def _fill(self) -> None:
        chunk = self._imap.sock.recv(_CHUNK)
        if not chunk:
            raise imaplib.IMAP4.abort("socket error: EOF")
        self._buffer += self._decompressor.decompress(chunk)

    def read(self, size: int) -> bytes:
        while len(self._buffer) < size:
            self._fill()
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def readline(self) -> bytes:
        while (end := self._buffer.find(b"\n")) < 0:
            if len(self._buffer) > _MAX_LINE:
                raise imaplib.IMAP4.error(f"got a line of more than {_MAX_LINE} bytes")
            self._fill()
        line = bytes(self._buffer[: end + 1])
        del self._buffer[: end + 1]
        return line


def enable_deflate(imap: imaplib.IMAP4) -> DeflateStream:
    """Ask for COMPRESS DEFLATE and, on OK, switch the connection's I/O to deflate."""
    typ, data = imap.xatom("COMPRESS", "DEFLATE")
    if typ != "OK":
        raise imaplib.IMAP4.error(f"COMPRESS DEFLATE refused: {data!r}")
    stream = DeflateStream(imap)
    imap.send = MethodType(lambda self, data: stream.send(data), imap)  # type: ignore[method-assign]
    imap.read = MethodType(lambda self, size: stream.read(size), imap)  # type: ignore[method-assign]
    imap.readline = MethodType(lambda self: stream.readline(), imap)  # type: ignore[method-assign]
    return stream
