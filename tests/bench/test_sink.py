"""The benchmark's sink counts every message once, however the stream is cut into reads.

It skips message bodies where they arrive (keeping four bytes that may begin the end
marker), so a marker split across two reads, a lone-dot message and commands pipelined after
the end are the cases that matter.
"""

from __future__ import annotations

import contextlib
import random

from bench.sink import Session


class FakeSocket:
    """Hands out the stream in the given pieces, one per ``recv_into``."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces
        self.sent: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.sent.append(bytes(data))

    def recv_into(self, buf: bytearray) -> int:
        if not self.pieces:
            return 0
        piece = self.pieces.pop(0)
        buf[: len(piece)] = piece
        return len(piece)


class Counter:
    value = 0

    def get_lock(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()


def converse(stream: bytes, cuts: list[int]) -> tuple[int, bytes]:
    pieces, last = [], 0
    for cut in [*sorted(cuts), len(stream)]:
        if cut > last:
            pieces.append(stream[last:cut])
            last = cut
    sock = FakeSocket(pieces)
    session = Session(sock, Counter(), None)  # type: ignore[arg-type]
    with contextlib.suppress(EOFError):
        session.run()
    return session.counter.value, b"".join(sock.sent)


BODIES = [b"", b"x\r\n", b"line\r\n..stuffed dot\r\n", b"\r\n.\r\r\n.x\r\n", b"a" * 40 + b"\r\n"]


def test_every_message_is_counted_once_however_the_reads_fall() -> None:
    rnd = random.Random(7)
    for _ in range(2000):
        bodies = [rnd.choice(BODIES) for _ in range(rnd.randint(1, 4))]
        stream = b"EHLO x\r\n" + b"".join(
            b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n" + body + b".\r\n" for body in bodies
        ) + b"QUIT\r\n"
        cuts = [rnd.randint(0, len(stream)) for _ in range(rnd.randint(0, 12))]
        count, replies = converse(stream, cuts)
        assert count == len(bodies), (stream, cuts)
        assert replies.count(b"250 2.0.0 kept") == len(bodies), (stream, cuts)
        assert replies.endswith(b"221 bye\r\n"), (stream, cuts)
