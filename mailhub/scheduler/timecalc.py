"""Pure time arithmetic for the scheduler: wall-clock times in named zones to UTC instants.

Everything here uses pytz the way it must be used: ``zone.localize`` to attach a zone to a wall
time, ``astimezone`` to view a UTC instant in a zone, and arithmetic only on UTC datetimes (never
``datetime(..., tzinfo=pytz_zone)``, which picks the zone's first historical offset, and never an
aware local datetime plus a timedelta, which keeps a stale offset across a DST change).

Two rules from the product brief live here:
- a wall time that does not exist (spring forward) becomes the first valid minute after the gap;
- a wall time that exists twice (fall back) is its first occurrence, the earlier instant.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache

import pytz
from pytz.tzinfo import BaseTzInfo

from mailhub.errors import MailhubError
from mailhub.scheduler.durations import Duration

DEFAULT_QUIET_HOURS = ("21:00", "08:00")
STEP_ZONES = ("home", "clinic", "current")
_CLOCK = re.compile(r"(\d{1,2}):(\d{2})")
_MAX_GAP_MINUTES = 2 * 24 * 60  # the longest real gap is a skipped day (Samoa, 2011)


class UnknownTimeZone(MailhubError):
    """A zone name that is not in the tz database."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"unknown time zone {name!r}",
            hint='use an IANA zone name such as "Europe/Istanbul" or "America/Chicago"',
        )
        self.name = name


@lru_cache(maxsize=512)
def get_zone(name: str) -> BaseTzInfo:
    """The pytz zone for an IANA name; UnknownTimeZone instead of pytz's KeyError."""
    try:
        return pytz.timezone(name)
    except (pytz.UnknownTimeZoneError, AttributeError, ValueError) as exc:
        raise UnknownTimeZone(str(name)) from exc


def is_valid_zone(name: str) -> bool:
    """True when ``name`` is a zone the scheduler can use (for validating case fields)."""
    try:
        get_zone(name)
    except UnknownTimeZone:
        return False
    return True


def parse_clock(text: str) -> time:
    """Parse "HH:MM" (24-hour) into a time; ValueError says what is wrong."""
    m = _CLOCK.fullmatch(text.strip()) if isinstance(text, str) else None
    if not m or int(m.group(1)) > 23 or int(m.group(2)) > 59:
        raise ValueError(f"{text!r} is not a 24-hour time HH:MM")
    return time(int(m.group(1)), int(m.group(2)))


def _to_utc(dt: datetime) -> datetime:
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"{dt!r} is a naive datetime where a UTC instant is needed")
    return dt.astimezone(UTC)


def localize_wall(wall: datetime, tz: str) -> datetime:
    """The UTC instant of a naive wall-clock time in zone ``tz``, applying the gap/overlap rules."""
    zone = get_zone(tz)
    try:
        return zone.localize(wall, is_dst=None).astimezone(UTC)
    except pytz.AmbiguousTimeError:
        # Both readings exist; the first occurrence is the earlier instant. Asking pytz for
        # both flags covers DST overlaps and also shifts of standard time (same dst flag).
        candidates = {zone.localize(wall, is_dst=flag).astimezone(UTC) for flag in (True, False)}
        return min(candidates)
    except pytz.NonExistentTimeError:
        minute = wall.replace(second=0, microsecond=0)
        for _ in range(_MAX_GAP_MINUTES):
            minute += timedelta(minutes=1)  # naive wall-clock arithmetic: no zone involved
            try:
                return zone.localize(minute, is_dst=None).astimezone(UTC)
            except pytz.NonExistentTimeError:
                continue
            except pytz.AmbiguousTimeError:
                return localize_wall(minute, tz)
        raise ValueError(f"{wall} in {tz} is in a gap longer than two days") from None


def event_instant(local: datetime, tz: str) -> datetime:
    """A case event given as a wall-clock time in its zone, as a UTC instant.

    A naive ``local`` is read in ``tz`` (gap: first valid minute after it; overlap: first
    occurrence). An aware one already pins its instant, so it is only converted to UTC.
    """
    get_zone(tz)  # an unknown zone is an error even when the time is aware
    if local.tzinfo is not None and local.utcoffset() is not None:
        return local.astimezone(UTC)
    return localize_wall(local, tz)


def local_date(instant: datetime, tz: str) -> date:
    """The calendar date of a UTC instant in zone ``tz``."""
    return _to_utc(instant).astimezone(get_zone(tz)).date()


def local_iso(utc_dt: datetime, tz: str) -> str:
    """ISO-8601 wall time in ``tz`` carrying its UTC offset (for ``send_at_local``)."""
    return _to_utc(utc_dt).astimezone(get_zone(tz)).isoformat()


def in_window(instant: datetime, start: datetime | None, end: datetime | None) -> bool:
    """True when both bounds are set and ``start <= instant < end``."""
    if start is None or end is None:
        return False
    return _to_utc(start) <= _to_utc(instant) < _to_utc(end)


def target_zone(
    step_zone: str,
    home_tz: str,
    clinic_tz: str | None,
    at: datetime,
    arrival_utc: datetime | None,
    return_home_utc: datetime | None,
) -> str:
    """The zone a step is sent in, judged at instant ``at``.

    "home" and "clinic" are fixed. "current" is the clinic's zone while the patient is there,
    i.e. ``arrival <= at < return_home`` with both events set, and the home zone otherwise.
    Callers pass the candidate send instant computed in the clinic's zone (see steps.py).
    """
    if step_zone == "home":
        return home_tz
    if step_zone == "clinic":
        if not clinic_tz:
            raise ValueError("the step is in the clinic's zone but the case has no procedure zone")
        return clinic_tz
    if step_zone != "current":
        raise ValueError(f"unknown step zone {step_zone!r}; expected one of {STEP_ZONES}")
    if clinic_tz and in_window(at, arrival_utc, return_home_utc):
        return clinic_tz
    return home_tz


def _as_clock(value: str | time) -> time:
    return value if isinstance(value, time) else parse_clock(value)


def in_quiet_hours(wall: time, quiet_hours: tuple[str | time, str | time]) -> bool:
    """True when a wall-clock time is in [start, end); the window may wrap midnight."""
    start, end = (_as_clock(v) for v in quiet_hours)
    if start == end:
        return False
    if start < end:
        return start <= wall < end
    return wall >= start or wall < end


def end_of_quiet_hours(
    instant: datetime, tz: str, quiet_hours: tuple[str | time, str | time] = DEFAULT_QUIET_HOURS
) -> datetime:
    """``instant`` unchanged, or, when it falls in quiet hours in ``tz``, the next time the
    wall clock there reads the window's end (computed on the calendar, so DST is honoured)."""
    start, end = (_as_clock(v) for v in quiet_hours)
    local = _to_utc(instant).astimezone(get_zone(tz))
    wall = local.time().replace(tzinfo=None)
    if not in_quiet_hours(wall, (start, end)):
        return _to_utc(instant)
    day = local.date()
    if start > end and wall >= start:
        day += timedelta(days=1)  # evening part of a window that wraps midnight
    at = localize_wall(datetime.combine(day, end), tz)
    if at < _to_utc(instant):
        # the end is in a repeated hour whose first pass is already over: its second pass
        # (a step is never moved earlier than its exact time)
        zone = get_zone(tz)
        at = max(zone.localize(datetime.combine(day, end), is_dst=flag).astimezone(UTC)
                 for flag in (True, False))
    return at


def send_time(
    anchor_utc: datetime,
    offset: Duration,
    local_time: str | time | None,
    zone: str,
    quiet_hours: tuple[str | time, str | time] = DEFAULT_QUIET_HOURS,
) -> datetime:
    """When a step is sent (UTC), per the brief's schedule rules.

    With ``local_time``: the anchor's calendar date in ``zone`` plus the offset's whole days as
    calendar days, at that wall time in ``zone`` (the offset's remaining hours are not used).
    Without: the anchor plus the exact offset, moved to the end of quiet hours if inside them.
    """
    anchor = _to_utc(anchor_utc)
    if local_time is not None:
        day = local_date(anchor, zone) + timedelta(days=offset.days)
        return localize_wall(datetime.combine(day, _as_clock(local_time)), zone)
    return end_of_quiet_hours(anchor + offset.as_timedelta(), zone, quiet_hours)
