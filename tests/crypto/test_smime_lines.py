"""``lines_within`` (the S/MIME writer's over-long-line check) agrees with measuring each line."""

from __future__ import annotations

import itertools
import random

from mailhub.crypto.smime import lines_within


def exact(data: bytes, limit: int) -> bool:
    return max(map(len, data.split(b"\n"))) <= limit


def test_agrees_with_the_exact_count_on_every_small_case() -> None:
    for lengths in itertools.product(range(0, 9), repeat=3):  # three lines of 0-8 bytes
        data = b"\n".join(b"x" * n for n in lengths)
        for limit in range(1, 10):
            assert lines_within(data, limit) == exact(data, limit), (lengths, limit)


def test_agrees_with_the_exact_count_on_random_bytes() -> None:
    rnd = random.Random(5)
    for _ in range(3000):
        data = bytes(rnd.choice(b"ab\r\n") for _ in range(rnd.randint(0, 400)))
        limit = rnd.randint(1, 60)
        assert lines_within(data, limit) == exact(data, limit), (data, limit)


def test_a_long_line_anywhere_in_a_large_body_is_found() -> None:
    line = b"a" * 70 + b"\r\n"
    body = line * 3000
    assert lines_within(body, 999)
    for at in (0, len(body) // 2, len(body)):
        long = body[:at] + b"b" * 1000 + body[at:]
        assert not lines_within(long, 999)
        assert lines_within(long, 1072)  # the long line joined to its neighbours' 72 bytes
