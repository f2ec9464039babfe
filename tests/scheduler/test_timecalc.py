"""Wall-clock to UTC across DST in both hemispheres, gaps, overlaps and quiet hours.

Expected instants are worked out by hand from the zones' published rules (noted beside each)
and, where the wall time exists, cross-checked with the standard library's zoneinfo, which
shares no code with pytz.
"""

from __future__ import annotations

from datetime import UTC, datetime, time
from zoneinfo import ZoneInfo

import pytest

from mailhub.scheduler.durations import parse_duration
from mailhub.scheduler.timecalc import (
    UnknownTimeZone,
    end_of_quiet_hours,
    event_instant,
    in_quiet_hours,
    is_valid_zone,
    local_iso,
    parse_clock,
    send_time,
    target_zone,
)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def zi(local: datetime, tz: str, fold: int = 0) -> datetime:
    """The independent reference: zoneinfo's reading of a wall time (fold=0 is the first)."""
    return local.replace(tzinfo=ZoneInfo(tz), fold=fold).astimezone(UTC)


@pytest.mark.parametrize(
    ("local", "tz", "expected"),
    [
        # Istanbul is UTC+3 all year.
        (datetime(2026, 12, 3, 8, 0), "Europe/Istanbul", utc(2026, 12, 3, 5, 0)),
        # Kolkata is UTC+5:30, no DST.
        (datetime(2026, 11, 19, 9, 0), "Asia/Kolkata", utc(2026, 11, 19, 3, 30)),
        # New York in winter (EST, UTC-5) and in summer (EDT, UTC-4).
        (datetime(2027, 1, 15, 9, 0), "America/New_York", utc(2027, 1, 15, 14, 0)),
        (datetime(2027, 7, 15, 9, 0), "America/New_York", utc(2027, 7, 15, 13, 0)),
        # Sydney: AEDT (UTC+11) in January, AEST (UTC+10) in July: the southern hemisphere.
        (datetime(2027, 1, 15, 9, 0), "Australia/Sydney", utc(2027, 1, 14, 22, 0)),
        (datetime(2027, 7, 15, 9, 0), "Australia/Sydney", utc(2027, 7, 14, 23, 0)),
        # Seconds are kept.
        (datetime(2026, 12, 3, 8, 0, 30), "Europe/Berlin", utc(2026, 12, 3, 7, 0, 30)),
    ],
)
def test_event_instant_plain(local: datetime, tz: str, expected: datetime) -> None:
    assert event_instant(local, tz) == expected
    assert expected == zi(local, tz)


@pytest.mark.parametrize(
    ("local", "tz", "expected"),
    [
        # US spring forward 2027-03-14 02:00 EST -> 03:00 EDT: 02:30 becomes 03:00 EDT = 07:00Z.
        (datetime(2027, 3, 14, 2, 30), "America/New_York", utc(2027, 3, 14, 7, 0)),
        (datetime(2027, 3, 14, 2, 0), "America/New_York", utc(2027, 3, 14, 7, 0)),
        (datetime(2027, 3, 14, 2, 59, 59), "America/New_York", utc(2027, 3, 14, 7, 0)),
        # EU spring forward 2027-03-28 02:00 CET -> 03:00 CEST: 03:00 CEST = 01:00Z.
        (datetime(2027, 3, 28, 2, 30), "Europe/Berlin", utc(2027, 3, 28, 1, 0)),
        # Sydney spring forward 2026-10-04 02:00 AEST -> 03:00 AEDT: 03:00 AEDT = 16:00Z the day before.
        (datetime(2026, 10, 4, 2, 30), "Australia/Sydney", utc(2026, 10, 3, 16, 0)),
    ],
)
def test_gap_moves_to_first_valid_minute_after(local: datetime, tz: str, expected: datetime) -> None:
    assert event_instant(local, tz) == expected
    # The instant is the one zoneinfo gives for the wall time at the end of the gap.
    assert expected == zi(datetime(local.year, local.month, local.day, 3, 0), tz)


@pytest.mark.parametrize(
    ("local", "tz", "expected"),
    [
        # US fall back 2026-11-01 02:00 EDT -> 01:00 EST: 01:30 first occurs in EDT = 05:30Z.
        (datetime(2026, 11, 1, 1, 30), "America/New_York", utc(2026, 11, 1, 5, 30)),
        # EU fall back 2026-10-25 03:00 CEST -> 02:00 CET: 02:30 first in CEST = 00:30Z.
        (datetime(2026, 10, 25, 2, 30), "Europe/Berlin", utc(2026, 10, 25, 0, 30)),
        # Sydney fall back 2027-04-04 03:00 AEDT -> 02:00 AEST: 02:30 first in AEDT = 15:30Z.
        (datetime(2027, 4, 4, 2, 30), "Australia/Sydney", utc(2027, 4, 3, 15, 30)),
    ],
)
def test_overlap_takes_first_occurrence(local: datetime, tz: str, expected: datetime) -> None:
    assert event_instant(local, tz) == expected
    assert expected == zi(local, tz, fold=0)
    assert expected < zi(local, tz, fold=1)


def test_aware_event_is_only_converted() -> None:
    aware = datetime(2026, 12, 3, 8, 0, tzinfo=ZoneInfo("Europe/Istanbul"))
    assert event_instant(aware, "America/Chicago") == utc(2026, 12, 3, 5, 0)


def test_unknown_zone() -> None:
    with pytest.raises(UnknownTimeZone, match="Mars/Olympus"):
        event_instant(datetime(2026, 1, 1, 9, 0), "Mars/Olympus")
    assert not is_valid_zone("Mars/Olympus")
    assert is_valid_zone("Asia/Kolkata")


def test_local_iso_carries_offset() -> None:
    assert local_iso(utc(2027, 3, 14, 7, 0), "America/New_York") == "2027-03-14T03:00:00-04:00"
    assert local_iso(utc(2027, 3, 14, 6, 59), "America/New_York") == "2027-03-14T01:59:00-05:00"
    assert local_iso(utc(2026, 11, 19, 3, 30), "Asia/Kolkata") == "2026-11-19T09:00:00+05:30"


def test_parse_clock() -> None:
    assert parse_clock("09:00") == time(9, 0)
    assert parse_clock("7:05") == time(7, 5)
    for bad in ("24:00", "09:60", "9", "09:00:00", "nine"):
        with pytest.raises(ValueError):
            parse_clock(bad)


# --- send_time with local_time ---------------------------------------------------------------


def test_local_time_in_gap() -> None:
    # 2027-03-15 12:00Z is 08:00 EDT on the 15th; one calendar day back at 02:30 lands in the gap.
    got = send_time(utc(2027, 3, 15, 12, 0), parse_duration("-1d"), "02:30", "America/New_York")
    assert got == utc(2027, 3, 14, 7, 0)


def test_local_time_in_overlap() -> None:
    got = send_time(utc(2026, 11, 2, 15, 0), parse_duration("-1d"), "01:30", "America/New_York")
    assert got == utc(2026, 11, 1, 5, 30)


def test_local_time_counts_calendar_days_across_us_dst() -> None:
    # Patient in Chicago, surgery in Istanbul on 2027-03-20 10:00 (+03) = 07:00Z = 02:00 CDT.
    anchor = event_instant(datetime(2027, 3, 20, 10, 0), "Europe/Istanbul")
    assert anchor == utc(2027, 3, 20, 7, 0)
    # 14 calendar days back is 2027-03-06, before the 03-14 change: 09:00 CST = 15:00Z.
    assert send_time(anchor, parse_duration("-14d"), "09:00", "America/Chicago") == utc(2027, 3, 6, 15, 0)
    # 3 days back is after it: 09:00 CDT = 14:00Z.
    assert send_time(anchor, parse_duration("-3d"), "09:00", "America/Chicago") == utc(2027, 3, 17, 14, 0)
    # The clinic's zone has no DST: 18:00 the day before = 15:00Z.
    assert send_time(anchor, parse_duration("-1d"), "18:00", "Europe/Istanbul") == utc(2027, 3, 19, 15, 0)
    assert utc(2027, 3, 6, 15, 0) == zi(datetime(2027, 3, 6, 9, 0), "America/Chicago")
    assert utc(2027, 3, 17, 14, 0) == zi(datetime(2027, 3, 17, 9, 0), "America/Chicago")


def test_anchor_date_is_taken_in_the_target_zone() -> None:
    # 2027-03-20 06:00 Istanbul = 03:00Z = 2027-03-19 22:00 CDT: in Chicago it is still the 19th.
    anchor = event_instant(datetime(2027, 3, 20, 6, 0), "Europe/Istanbul")
    assert send_time(anchor, parse_duration("-14d"), "09:00", "America/Chicago") == utc(2027, 3, 5, 15, 0)


def test_only_whole_days_count_with_local_time() -> None:
    anchor = utc(2026, 12, 3, 5, 0)  # 08:00 in Istanbul
    assert send_time(anchor, parse_duration("+1d20h"), "10:00", "Europe/Istanbul") == utc(2026, 12, 4, 7, 0)
    assert send_time(anchor, parse_duration("-36h"), "10:00", "Europe/Istanbul") == utc(2026, 12, 2, 7, 0)


def test_southern_hemisphere_both_changes() -> None:
    # Home Sydney, procedure 2026-10-10 09:00 Bangkok (+07) = 02:00Z = 13:00 AEDT on the 10th.
    anchor = event_instant(datetime(2026, 10, 10, 9, 0), "Asia/Bangkok")
    # 14 days back (2026-09-26) Sydney is still on AEST (+10): 09:00 = 23:00Z the day before.
    assert send_time(anchor, parse_duration("-14d"), "09:00", "Australia/Sydney") == utc(2026, 9, 25, 23, 0)
    # Back home 2027-03-30 18:00 AEDT; a week later Sydney is on AEST: 10:00 = 00:00Z.
    home = event_instant(datetime(2027, 3, 30, 18, 0), "Australia/Sydney")
    assert home == utc(2027, 3, 30, 7, 0)
    assert send_time(home, parse_duration("+7d"), "10:00", "Australia/Sydney") == utc(2027, 4, 6, 0, 0)
    assert utc(2027, 4, 6, 0, 0) == zi(datetime(2027, 4, 6, 10, 0), "Australia/Sydney")


def test_berlin_follow_up_across_spring_change() -> None:
    home = event_instant(datetime(2027, 3, 25, 20, 0), "Europe/Berlin")  # CET: 19:00Z
    assert home == utc(2027, 3, 25, 19, 0)
    assert send_time(home, parse_duration("+7d"), "10:00", "Europe/Berlin") == utc(2027, 4, 1, 8, 0)


def test_half_hour_zone() -> None:
    anchor = event_instant(datetime(2026, 12, 3, 8, 0), "Europe/Istanbul")  # 05:00Z = 10:30 IST
    assert send_time(anchor, parse_duration("-14d"), "09:00", "Asia/Kolkata") == utc(2026, 11, 19, 3, 30)
    # Exact offsets keep the half hour: 05:00Z + 2h = 12:30 IST, not quiet.
    assert send_time(anchor, parse_duration("2h"), None, "Asia/Kolkata") == utc(2026, 12, 3, 7, 0)


# --- send_time without local_time: exact offset and quiet hours -------------------------------


def test_exact_offset_outside_quiet_hours_is_kept() -> None:
    assert send_time(utc(2026, 12, 3, 5, 0), parse_duration("+1d12h"), None, "Europe/Istanbul") == utc(
        2026, 12, 4, 17, 0
    )


@pytest.mark.parametrize(
    ("instant", "expected"),
    [
        # Istanbul (+03). After midnight, inside the wrapped window: to 08:00 the same day.
        (utc(2026, 11, 30, 21, 30), utc(2026, 12, 1, 5, 0)),
        # 21:30 local, the evening part: to 08:00 the next day.
        (utc(2026, 11, 30, 18, 30), utc(2026, 12, 1, 5, 0)),
        # 21:00 sharp is quiet; 08:00 sharp is not; 20:59 is not.
        (utc(2026, 11, 30, 18, 0), utc(2026, 12, 1, 5, 0)),
        (utc(2026, 12, 1, 5, 0), utc(2026, 12, 1, 5, 0)),
        (utc(2026, 11, 30, 17, 59), utc(2026, 11, 30, 17, 59)),
        (utc(2026, 12, 1, 4, 59, 59), utc(2026, 12, 1, 5, 0)),
    ],
)
def test_quiet_hours_wrap_midnight(instant: datetime, expected: datetime) -> None:
    assert send_time(instant, parse_duration("0"), None, "Europe/Istanbul") == expected


def test_arrival_plus_two_hours_into_the_night() -> None:
    arrival = event_instant(datetime(2026, 11, 30, 22, 30), "Europe/Istanbul")
    assert send_time(arrival, parse_duration("+2h"), None, "Europe/Istanbul") == utc(2026, 12, 1, 5, 0)


def test_quiet_hours_across_fall_back() -> None:
    # 2026-10-31 23:00 EDT = 2026-11-01 03:00Z; the clocks go back overnight, so 08:00 EST = 13:00Z.
    assert end_of_quiet_hours(utc(2026, 11, 1, 3, 0), "America/New_York") == utc(2026, 11, 1, 13, 0)
    assert utc(2026, 11, 1, 13, 0) == zi(datetime(2026, 11, 1, 8, 0), "America/New_York")


def test_quiet_hours_across_spring_forward() -> None:
    # 2027-03-13 22:00 EST = 2027-03-14 03:00Z; by morning it is EDT: 08:00 EDT = 12:00Z.
    assert end_of_quiet_hours(utc(2027, 3, 14, 3, 0), "America/New_York") == utc(2027, 3, 14, 12, 0)
    # An instant in the repeated hour of fall-back night (01:30 EST, second time) is quiet too.
    assert end_of_quiet_hours(utc(2026, 11, 1, 6, 30), "America/New_York") == utc(2026, 11, 1, 13, 0)


def test_quiet_hours_ending_in_a_gap() -> None:
    # Window 23:00-02:30 in New York; the night of the spring change the end does not exist.
    got = end_of_quiet_hours(utc(2027, 3, 14, 4, 30), "America/New_York", ("23:00", "02:30"))
    assert got == utc(2027, 3, 14, 7, 0)


def test_quiet_window_not_wrapping_and_empty() -> None:
    assert end_of_quiet_hours(utc(2026, 12, 1, 10, 0), "Europe/Istanbul", ("12:00", "14:00")) == utc(
        2026, 12, 1, 11, 0
    )
    assert in_quiet_hours(time(3, 0), ("08:00", "08:00")) is False
    assert in_quiet_hours(time(23, 0), ("21:00", "08:00")) is True
    assert in_quiet_hours(time(12, 0), ("21:00", "08:00")) is False


# --- target zone ------------------------------------------------------------------------------

HOME, CLINIC = "America/Chicago", "Europe/Istanbul"
ARRIVE, BACK = utc(2027, 3, 16, 11, 0), utc(2027, 3, 28, 22, 0)


@pytest.mark.parametrize(
    ("at", "arrival", "back", "expected"),
    [
        (utc(2027, 3, 20, 0, 0), ARRIVE, BACK, CLINIC),
        (ARRIVE, ARRIVE, BACK, CLINIC),
        (BACK, ARRIVE, BACK, HOME),
        (utc(2027, 3, 10, 0, 0), ARRIVE, BACK, HOME),
        (utc(2027, 3, 20, 0, 0), None, BACK, HOME),
        (utc(2027, 3, 20, 0, 0), ARRIVE, None, HOME),
    ],
)
def test_current_zone(at: datetime, arrival: datetime | None, back: datetime | None, expected: str) -> None:
    assert target_zone("current", HOME, CLINIC, at, arrival, back) == expected


def test_fixed_zones() -> None:
    at = utc(2027, 3, 20, 0, 0)
    assert target_zone("home", HOME, CLINIC, at, ARRIVE, BACK) == HOME
    assert target_zone("clinic", HOME, CLINIC, utc(2027, 1, 1), None, None) == CLINIC
    with pytest.raises(ValueError):
        target_zone("elsewhere", HOME, CLINIC, at, None, None)


def test_quiet_hours_ending_in_the_repeated_hour_never_move_a_step_earlier() -> None:
    # Window 22:00-01:30 in New York; on 2026-11-01 01:00-02:00 happens twice. An instant at
    # 01:15 EST (the second time, 06:15Z) is quiet; the first 01:30 (05:30Z) is already past,
    # so the window ends at the second 01:30 (06:30Z), not three quarters of an hour earlier.
    instant = zi(datetime(2026, 11, 1, 1, 15), "America/New_York", fold=1)
    assert instant == utc(2026, 11, 1, 6, 15)
    got = end_of_quiet_hours(instant, "America/New_York", ("22:00", "01:30"))
    assert got == zi(datetime(2026, 11, 1, 1, 30), "America/New_York", fold=1) == utc(2026, 11, 1, 6, 30)
    # in the first pass of that hour the first 01:30 still ends it
    first = zi(datetime(2026, 11, 1, 1, 15), "America/New_York")
    assert end_of_quiet_hours(first, "America/New_York", ("22:00", "01:30")) == utc(2026, 11, 1, 5, 30)
