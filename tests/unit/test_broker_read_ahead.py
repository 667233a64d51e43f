"""The read-ahead transport (shared.broker) against a socket that plays the broker's part.

A pure unit test of the buffering: the bytes a broker would send arrive in pieces, with a
timeout in the middle of a frame; the real broker is used in tests/integration.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

from shared import broker


def _frame(channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", 1, channel, len(payload)) + payload + b"\xce"


@pytest.fixture
def wire() -> Iterator[tuple[broker._ReadAheadTCPTransport, socket.socket]]:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    transport = broker._ReadAheadTCPTransport(f"127.0.0.1:{port}", connect_timeout=5)
    transport.connect()  # writes the protocol header, which the "broker" reads first
    server, _ = listener.accept()
    assert server.recv(8) == b"AMQP\x00\x00\x09\x01"
    yield transport, server
    server.close()
    transport.close()
    listener.close()


def test_frames_cut_anywhere_and_a_timeout_between_pieces_lose_nothing(
    wire: tuple[broker._ReadAheadTCPTransport, socket.socket],
) -> None:
    transport, server = wire
    first, second = _frame(1, b"a" * 40_000), _frame(2, b"bc")
    data = first + second
    cuts = [3, 5, 20_003, 40_007, len(first) + 4]  # in headers, payloads and a frame end
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    frames = []
    for piece in pieces:
        server.sendall(piece)
        try:
            with transport.having_timeout(0.05):
                frames.append(transport.read_frame())
        except TimeoutError:
            continue  # the frame is not complete yet: what came stays for the next read
        while True:  # the rest of this piece may hold another whole frame
            try:
                with transport.having_timeout(0.05):
                    frames.append(transport.read_frame())
            except TimeoutError:
                break
    assert [(channel, payload) for _, channel, payload in frames] == [
        (1, b"a" * 40_000),
        (2, b"bc"),
    ]
