"""Loopback TCP helpers: a port that listens, a port that refuses, a switchable proxy."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial


@contextlib.contextmanager
def listening_port() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts TCP connections (and says nothing)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield server.getsockname()[1]


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; ``start``/``stop`` switch the path on and off.

    Lets a test take "RabbitMQ" away from one client and give it back, with the real broker
    behind it, without disturbing the broker for anyone else. With ``delay`` every byte arrives
    that many seconds after it was sent, in each direction, as over a long link (bytes sent
    meanwhile are on their way too): a server "far away" for the benchmarks.
    """

    def __init__(self, target_port: int, *, delay: float = 0.0) -> None:
        self.target_port = target_port
        self.delay = delay
        self.port = closed_port()
        self._server: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(16)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            # shutdown() wakes the accept() blocked in the other thread; close() alone does not.
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)
            self._server.close()
            self._server = None
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._sockets += [client, upstream]
            if self.delay > 0:  # each write on its way at once, as the sender's own
                for sock in (client, upstream):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        forward, end = (sink.sendall, partial(_shut, sink)) if self.delay <= 0 else self._late(sink)
        try:
            while data := source.recv(65536):
                forward(data)
        except OSError:
            pass
        finally:
            end()

    def _late(self, sink: socket.socket) -> tuple[Callable[[bytes], None], Callable[[], None]]:
        """What ``_pipe`` forwards reaches ``sink`` ``delay`` after it was read."""
        in_flight: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

        def deliver() -> None:
            try:
                while data := _when_due(*in_flight.get()):
                    sink.sendall(data)
            except OSError:
                pass
            finally:
                _shut(sink)

        threading.Thread(target=deliver, daemon=True).start()
        return (
            lambda data: in_flight.put((time.monotonic() + self.delay, data)),
            lambda: in_flight.put((time.monotonic() + self.delay, b"")),
        )


def _when_due(due: float, data: bytes) -> bytes:
    time.sleep(max(0.0, due - time.monotonic()))
    return data


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
