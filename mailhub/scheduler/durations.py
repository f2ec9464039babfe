"""Signed durations in care plans ("-14d", "+1d12h", "90m", "-30s").

Kept as whole days plus remaining seconds rather than one timedelta, because a step with a
``local_time`` counts only the whole days, and counts them as calendar days in the patient's
zone (a day across a DST change is 23 or 25 hours), while a step without one adds the exact span.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

from mailhub.errors import RuleError

_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_PART = re.compile(r"(\d+)\s*([dhms])")
_SHAPE = re.compile(r"[+-]?\s*(?:\d+\s*[dhms]\s*)+")
_MAX_DAYS = 3660  # ten years: anything longer is a typo, not a care plan


@dataclass(frozen=True)
class Duration:
    """A signed span: ``days`` whole days and ``seconds`` more, both carrying the same sign."""

    days: int
    seconds: int
    text: str = ""

    @property
    def total_seconds(self) -> int:
        return self.days * 86400 + self.seconds

    def as_timedelta(self) -> timedelta:
        """The exact span (for arithmetic on UTC instants only)."""
        return timedelta(seconds=self.total_seconds)

    @property
    def negative(self) -> bool:
        return self.total_seconds < 0

    def __str__(self) -> str:
        return self.text or format_duration(self.total_seconds)


def parse_duration(text: str, *, where: str = "duration") -> Duration:
    """Parse "[+-]<n>d<n>h<n>m<n>s" (each unit at most once, in that order; spaces allowed).

    ``where`` names the place in the rules for the error message. A bare "0" is zero.
    """
    if not isinstance(text, str):
        raise RuleError(
            f"{where} = {text!r} is not a duration",
            hint='write it as a quoted string such as "-14d", "+1d12h", "90m"',
        )
    raw = text.strip()
    if raw in ("0", "+0", "-0"):
        return Duration(0, 0, raw)
    if not _SHAPE.fullmatch(raw):
        raise RuleError(
            f"{where} = {text!r} is not a duration",
            hint='use a sign and d/h/m/s parts, e.g. "-14d", "+1d12h", "90m", "-30s"',
        )
    sign = -1 if raw.startswith("-") else 1
    parts = _PART.findall(raw)
    units = [unit for _, unit in parts]
    order = "dhms"
    if len(set(units)) != len(units) or units != sorted(units, key=order.index):
        raise RuleError(
            f"{where} = {text!r} repeats a unit or has them out of order",
            hint='give each unit at most once, largest first, e.g. "1d12h" not "12h1d"',
        )
    total = sum(int(n) * _UNIT_SECONDS[unit] for n, unit in parts)
    if total > _MAX_DAYS * 86400:
        raise RuleError(f"{where} = {text!r} is longer than ten years", hint="check the number")
    days, seconds = divmod(total, 86400)
    return Duration(sign * days, sign * seconds, raw)


def format_duration(total_seconds: int) -> str:
    """The canonical text of a span in seconds ("-1d12h", "90m" becomes "1h30m", "0")."""
    if total_seconds == 0:
        return "0"
    sign = "-" if total_seconds < 0 else ""
    rest = abs(total_seconds)
    out = []
    for unit, size in _UNIT_SECONDS.items():
        n, rest = divmod(rest, size)
        if n:
            out.append(f"{n}{unit}")
    return sign + "".join(out)
