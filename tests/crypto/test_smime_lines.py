"""``lines_within`` (the S/MIME writer's over-long-line check) agrees with measuring each line."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mailhub.crypto.smime import lines_within


def exact(data: bytes, limit: int) -> bool:
    return max(map(len, data.split(b"\n"))) <= limit


@given(st.lists(st.integers(0, 40), max_size=60), st.integers(1, 30))
def test_agrees_with_the_exact_count(lengths: list[int], limit: int) -> None:
    data = b"\n".join(b"x" * n for n in lengths)
    assert lines_within(data, limit) == exact(data, limit)


@given(st.binary(max_size=400), st.integers(1, 50))
def test_agrees_on_any_bytes(data: bytes, limit: int) -> None:
    assert lines_within(data, limit) == exact(data, limit)


def test_a_long_line_anywhere_in_a_large_body_is_found() -> None:
    line = b"a" * 70 + b"\r\n"
    body = line * 3000
    assert lines_within(body, 999)
    for at in (0, len(body) // 2, len(body)):
        long = body[:at] + b"b" * 1000 + body[at:]
        assert not lines_within(long, 999)
        assert lines_within(long, 1072)  # the long line joined to its neighbours' 72 bytes
