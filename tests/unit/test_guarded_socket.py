"""What a server can make Mailroom read is bounded per answer: bytes, announced literals,
inflated bytes and time; a write of ours starts the next answer."""

from __future__ import annotations

import socket
import threading
import time
import zlib
from collections.abc import Iterator

import pytest

from shared.mail.guarded_socket import AnswerLimits, AnswerTooLarge, GuardedSocket, ReadGuard

LIMITS = AnswerLimits(max_bytes=64 * 1024, max_seconds=0.5, min_bytes_per_second=1024 * 1024)


@pytest.fixture
def pair() -> Iterator[tuple[GuardedSocket, socket.socket]]:
    ours, theirs = socket.socketpair()
    guarded = GuardedSocket(ours.family, ours.type, ours.proto, fileno=ours.detach())
    guarded.guard = ReadGuard(LIMITS)
    guarded.settimeout(5)
    yield guarded, theirs
    guarded.close()
    theirs.close()


def send_in_background(sock: socket.socket, chunks: Iterator[bytes]) -> threading.Thread:
    def feed() -> None:
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except OSError:
            pass  # the reader gave up and closed

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    return thread


def test_a_greeting_that_never_ends_is_cut_off_at_the_limit(
    pair: tuple[GuardedSocket, socket.socket],
) -> None:
    ours, theirs = pair
    send_in_background(theirs, iter(lambda: b"220-still greeting you\r\n", None))
    reader = ours.makefile("rb")
    with pytest.raises(AnswerTooLarge) as cut:
        while True:
            reader.readline(8193)
    assert cut.value.reason == "server sent more than 64 KiB in its greeting"


def test_each_command_starts_a_fresh_answer(pair: tuple[GuardedSocket, socket.socket]) -> None:
    ours, theirs = pair
    reader = ours.makefile("rb")
    line = b"250-" + b"x" * 1000 + b"\r\n"
    for _ in range(3):  # 3 answers of 40 KiB each: over the limit together, not alone
        ours.sendall(b"EHLO mailroom\r\n")
        assert theirs.recv(100) == b"EHLO mailroom\r\n"
        theirs.sendall(line * 40)
        for _ in range(40):
            assert reader.readline(8193) == line


def test_a_huge_literal_is_refused_before_it_is_read(
    pair: tuple[GuardedSocket, socket.socket],
) -> None:
    ours, _ = pair
    reader = ours.makefile("rb")
    ours.sendall(b"a1 UID FETCH 1 (BODY.PEEK[])\r\n")
    started = time.monotonic()
    with pytest.raises(AnswerTooLarge) as refused:
        reader.read(10_000_000_000)
    assert time.monotonic() - started < 0.5  # nothing was waited for, nothing allocated
    assert refused.value.reason == (
        "server announced 10000000000 bytes in its answer to UID FETCH, more than the "
        "64 KiB allowed"
    )


def test_a_larger_answer_is_allowed_only_where_the_caller_expects_one(
    pair: tuple[GuardedSocket, socket.socket],
) -> None:
    ours, theirs = pair
    reader = ours.makefile("rb")
    mail = b"x" * 200_000
    with ours.guard.allowing(len(mail)):
        ours.sendall(b"RETR 1\r\n")
        send_in_background(theirs, iter([mail]))
        assert reader.read(len(mail)) == mail
    ours.sendall(b"RETR 2\r\n")
    send_in_background(theirs, iter([mail]))
    with pytest.raises(AnswerTooLarge):
        reader.read(len(mail))


def test_a_deflate_bomb_is_cut_off_after_inflating_the_limit(
    pair: tuple[GuardedSocket, socket.socket],
) -> None:
    ours, theirs = pair
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = packer.compress(b"* 1 EXISTS " + b"\0" * 100_000_000) + packer.flush(zlib.Z_SYNC_FLUSH)
    assert len(bomb) < 200_000  # 100 MB once inflated
    reader = ours.makefile("rb")
    reader.inflate()
    ours.sendall(b"a2 NOOP\r\n")
    send_in_background(theirs, iter([bomb]))
    with pytest.raises(AnswerTooLarge) as cut:
        reader.readline(1_000_001)
    assert cut.value.reason == "server sent more than 64 KiB in its answer to NOOP"


def test_a_server_trickling_one_byte_at_a_time_is_cut_off_in_time(
    pair: tuple[GuardedSocket, socket.socket],
) -> None:
    ours, theirs = pair

    def trickle() -> Iterator[bytes]:
        while True:
            yield b"+"
            time.sleep(0.05)

    send_in_background(theirs, trickle())
    started = time.monotonic()
    with pytest.raises(AnswerTooLarge) as cut:
        ours.makefile("rb").readline(8193)
    assert cut.value.reason == "server took more than 0.5 s to send its greeting"
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize(
    ("command", "named"),
    [
        (b"a1 UID FETCH 1:* (BODY.PEEK[])\r\n", "its answer to UID FETCH"),
        (b"AUTH PLAIN c2VjcmV0\r\n", "its answer to AUTH"),
        (b"c2VjcmV0IHBhc3N3b3Jk\r\n", "its answer"),  # a SASL response: never quoted
        (b"PASS hunter2\r\n", "its answer to PASS"),
    ],
)
def test_a_reason_names_the_command_never_its_arguments(
    pair: tuple[GuardedSocket, socket.socket], command: bytes, named: str
) -> None:
    ours, _ = pair
    ours.sendall(command)
    with pytest.raises(AnswerTooLarge) as cut:
        ours.makefile("rb").read(1_000_000)
    assert cut.value.reason.endswith(named + ", more than the 64 KiB allowed")
