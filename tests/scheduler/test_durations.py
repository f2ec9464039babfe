"""Durations: whole days kept apart from the rest, because local_time steps count calendar days."""

from __future__ import annotations

from datetime import timedelta

import pytest

from mailhub.errors import RuleError
from mailhub.scheduler.durations import Duration, format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "days", "seconds"),
    [
        ("-14d", -14, 0),
        ("+1d12h", 1, 43200),
        ("90m", 0, 5400),
        ("2d", 2, 0),
        ("-30s", 0, -30),
        ("-36h", -1, -43200),
        ("1d 2h 3m 4s", 1, 7384),
        ("0", 0, 0),
        ("-0d", 0, 0),
        ("48h", 2, 0),
    ],
)
def test_parse_valid(text: str, days: int, seconds: int) -> None:
    d = parse_duration(text)
    assert (d.days, d.seconds) == (days, seconds)
    assert d.as_timedelta() == timedelta(days=days, seconds=seconds)


@pytest.mark.parametrize("text", ["", "14", "d", "1x", "12h1d", "1d1d", "--1d", "1.5d", "1 d x", "+"])
def test_parse_invalid_names_the_place(text: str) -> None:
    with pytest.raises(RuleError) as info:
        parse_duration(text, where="offset")
    assert "offset" in str(info.value)
    assert repr(text) in str(info.value)


def test_non_string_is_refused() -> None:
    with pytest.raises(RuleError, match="not a duration"):
        parse_duration(14)  # type: ignore[arg-type]


def test_absurd_length_is_refused() -> None:
    with pytest.raises(RuleError, match="ten years"):
        parse_duration("99999d")


def test_format_round_trip() -> None:
    assert format_duration(parse_duration("-1d12h").total_seconds) == "-1d12h"
    assert format_duration(5400) == "1h30m"
    assert str(Duration(0, 0)) == "0"
    assert parse_duration("-1d12h").negative
