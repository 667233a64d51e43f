"""Standard-library IMAP and POP3 clients pinned to the lab's loopback address.

``imaplib`` and ``poplib`` use their ``host`` both to connect and as the TLS name (SNI and
certificate check). These subclasses always connect to 127.0.0.1 (from ``source``, default
127.0.0.1) and use ``host`` only as the TLS name, so a test can ask for ``mail.lab.test``
without DNS. ``LabIMAP4*.compress()`` adds COMPRESS=DEFLATE, which imaplib lacks: after the
server's OK both directions are raw deflate (zlib wbits -15), sync-flushed per write.
"""

from __future__ import annotations

import imaplib
import poplib
import socket
import ssl
import zlib
from typing import TYPE_CHECKING

from tests.lab.dovecot import HOST

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer


def tls_context(ca: str | None) -> ssl.SSLContext:
    """A client context that verifies certificates against ``ca`` (the system's if None)."""
    return ssl.create_default_context(cafile=ca)


def _connect(port: int, timeout: float | None, source: str) -> socket.socket:
    return socket.create_connection((HOST, port), timeout, source_address=(source, 0))


class _Deflate:
    def __init__(self) -> None:
        self.compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
        self.decompressor = zlib.decompressobj(-15)
        self.buffer = bytearray()
        self.bytes_on_wire = 0


class LabIMAP4(imaplib.IMAP4):
    """IMAP on a plain port (``starttls`` upgrades, verifying the certificate for ``host``)."""

    def __init__(self, host: str, port: int, *, source: str = HOST, timeout: float = 10) -> None:
        self._source = source
        self._deflate: _Deflate | None = None
        super().__init__(host, port, timeout)

    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        return _connect(self.port, timeout, self._source)

    def compress(self) -> None:
        """``COMPRESS DEFLATE``; everything after the server's OK is compressed."""
        typ, data = self.xatom("COMPRESS", "DEFLATE")
        if typ != "OK":
            raise self.error(f"COMPRESS DEFLATE refused: {data!r}")
        self._deflate = _Deflate()

    @property
    def compressed_bytes_received(self) -> int:
        """Bytes read from the socket since ``compress()`` (before inflating)."""
        return self._deflate.bytes_on_wire if self._deflate else 0

    def send(self, data: ReadableBuffer) -> None:
        if self._deflate is None:
            super().send(data)
            return
        z = self._deflate.compressor
        self.sock.sendall(z.compress(bytes(data)) + z.flush(zlib.Z_SYNC_FLUSH))

    def read(self, size: int) -> bytes:
        if self._deflate is None:
            return super().read(size)
        while len(self._deflate.buffer) < size:
            self._inflate_more()
        return self._take(size)

    def readline(self) -> bytes:
        if self._deflate is None:
            return super().readline()
        while (end := self._deflate.buffer.find(b"\n")) < 0:
            self._inflate_more()
        return self._take(end + 1)

    def _inflate_more(self) -> None:
        assert self._deflate is not None
        chunk = self.sock.recv(65536)
        if not chunk:
            raise self.abort("socket error: EOF")
        self._deflate.bytes_on_wire += len(chunk)
        self._deflate.buffer += self._deflate.decompressor.decompress(chunk)

    def _take(self, size: int) -> bytes:
        assert self._deflate is not None
        data = bytes(self._deflate.buffer[:size])
        del self._deflate.buffer[:size]
        return data


class LabIMAP4_SSL(LabIMAP4):  # named after imaplib.IMAP4_SSL
    """IMAP over implicit TLS; the certificate is verified for ``host`` with ``context``."""

    def __init__(
        self,
        host: str,
        port: int,
        context: ssl.SSLContext,
        *,
        source: str = HOST,
        timeout: float = 10,
    ) -> None:
        self._tls = context
        super().__init__(host, port, source=source, timeout=timeout)

    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        raw = _connect(self.port, timeout, self._source)
        try:
            return self._tls.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


class LabPOP3(poplib.POP3):
    """POP3 on a plain port (``stls`` upgrades, verifying the certificate for ``host``)."""

    def __init__(self, host: str, port: int, *, source: str = HOST, timeout: float = 10) -> None:
        self._source = source
        super().__init__(host, port, timeout)

    def _create_socket(self, timeout: float) -> socket.socket:
        return _connect(self.port, timeout, self._source)


class LabPOP3_SSL(LabPOP3):  # named after poplib.POP3_SSL
    """POP3 over implicit TLS; the certificate is verified for ``host`` with ``context``."""

    def __init__(
        self,
        host: str,
        port: int,
        context: ssl.SSLContext,
        *,
        source: str = HOST,
        timeout: float = 10,
    ) -> None:
        self._tls = context
        super().__init__(host, port, source=source, timeout=timeout)

    def _create_socket(self, timeout: float) -> socket.socket:
        raw = _connect(self.port, timeout, self._source)
        try:
            return self._tls.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise
