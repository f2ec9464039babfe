"""A whole care plan placed for a real case, with instants worked out by hand.

The case: patient at home in Chicago, hip replacement in Istanbul (+03 all year) in March 2027,
across the US DST change on 2027-03-14 (CST -06 before, CDT -05 after).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailhub.scheduler.plans import CarePlan, load_care_plans
from mailhub.scheduler.steps import (
    CaseTimes,
    PlannedStep,
    classify_due,
    compute_schedule,
    unscheduled_steps,
)

REPO = Path(__file__).resolve().parents[2]


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.fixture(scope="module")
def hip() -> CarePlan:
    return load_care_plans(REPO / "rules", REPO / "templates")["hip-replacement"]


ARRIVAL = utc(2027, 3, 16, 11, 0)      # 14:00 Istanbul
PROCEDURE = utc(2027, 3, 20, 7, 0)     # 10:00 Istanbul, 02:00 CDT on the 20th
DISCHARGE = utc(2027, 3, 25, 8, 0)     # 11:00 Istanbul, 03:00 CDT on the 25th
RETURN_HOME = utc(2027, 3, 28, 22, 0)  # 17:00 CDT


def case(**events: datetime | None) -> CaseTimes:
    base: dict[str, datetime | None] = {
        "arrival": ARRIVAL, "procedure": PROCEDURE, "discharge": DISCHARGE, "return_home": RETURN_HOME}
    base.update(events)
    return CaseTimes("America/Chicago", "Europe/Istanbul", base)


def by_id(planned: list[PlannedStep]) -> dict[str, PlannedStep]:
    return {p.step_id: p for p in planned}


def test_full_schedule(hip: CarePlan) -> None:
    got = {p.step_id: (p.send_at_utc, p.timezone) for p in compute_schedule(hip, case())}
    assert got == {
        "prep-guide": (utc(2027, 3, 6, 15, 0), "America/Chicago"),          # 09:00 CST
        "travel-checklist": (utc(2027, 3, 13, 15, 0), "America/Chicago"),   # 09:00 CST, last day
        "arrival-welcome": (utc(2027, 3, 16, 13, 0), "Europe/Istanbul"),    # 16:00, not quiet
        "fasting-instructions": (utc(2027, 3, 19, 15, 0), "Europe/Istanbul"),  # 18:00
        "wound-care-day-1": (utc(2027, 3, 26, 7, 0), "Europe/Istanbul"),    # 10:00, still there
        "follow-up-day-7": (utc(2027, 4, 4, 15, 0), "America/Chicago"),     # 10:00 CDT
        "follow-up-day-30": (utc(2027, 4, 27, 15, 0), "America/Chicago"),
        "follow-up-day-90": (utc(2027, 6, 26, 15, 0), "America/Chicago"),
    }


def test_schedule_is_in_send_order_with_windows(hip: CarePlan) -> None:
    planned = compute_schedule(hip, case())
    assert [p.send_at_utc for p in planned] == sorted(p.send_at_utc for p in planned)
    steps = by_id(planned)
    assert steps["prep-guide"].valid_until_utc == utc(2027, 3, 9, 15, 0)  # valid_for 3d
    assert steps["fasting-instructions"].valid_until_utc == utc(2027, 3, 19, 19, 0)  # 4h
    assert steps["wound-care-day-1"].anchor == "discharge"
    assert steps["prep-guide"].template == "prep-guide"


def test_current_zone_goes_home_when_patient_left(hip: CarePlan) -> None:
    # Home on 2027-03-25 20:00 CDT (= 03-26 01:00Z): the day-1 mail at 10:00 Istanbul (07:00Z)
    # would come after that, so it is sent at 10:00 in Chicago: discharge is the 25th there.
    planned = by_id(compute_schedule(hip, case(return_home=utc(2027, 3, 26, 1, 0))))
    assert (planned["wound-care-day-1"].send_at_utc, planned["wound-care-day-1"].timezone) == (
        utc(2027, 3, 26, 15, 0), "America/Chicago")


def test_current_zone_is_home_without_return_date(hip: CarePlan) -> None:
    c = case(return_home=None)
    planned = by_id(compute_schedule(hip, c))
    assert planned["wound-care-day-1"].timezone == "America/Chicago"
    assert planned["wound-care-day-1"].send_at_utc == utc(2027, 3, 26, 15, 0)
    assert not any(s.startswith("follow-up") for s in planned)
    missing = unscheduled_steps(hip, c)
    assert [u.step_id for u in missing] == ["follow-up-day-7", "follow-up-day-30", "follow-up-day-90"]
    assert all("return_home" in u.reason for u in missing)


def test_only_procedure_known(hip: CarePlan) -> None:
    c = case(arrival=None, discharge=None, return_home=None)
    assert [p.step_id for p in compute_schedule(hip, c)] == [
        "prep-guide", "travel-checklist", "fasting-instructions"]


def test_clinic_steps_wait_for_the_clinic_zone(hip: CarePlan) -> None:
    c = CaseTimes("America/Chicago", None, {"procedure": PROCEDURE})
    ids = [p.step_id for p in compute_schedule(hip, c)]
    assert ids == ["prep-guide", "travel-checklist"]
    assert "fasting-instructions" in [u.step_id for u in unscheduled_steps(hip, c)]


def test_naive_event_is_refused(hip: CarePlan) -> None:
    with pytest.raises(ValueError, match="naive"):
        compute_schedule(hip, case(procedure=datetime(2027, 3, 20, 7, 0)))


def test_classify_due(hip: CarePlan) -> None:
    prep = by_id(compute_schedule(hip, case()))["prep-guide"]  # 03-06 15:00Z, valid 3 days
    assert classify_due(prep, utc(2027, 3, 6, 14, 59, 59)) == "pending"
    assert classify_due(prep, utc(2027, 3, 6, 15, 0)) == "due"
    assert classify_due(prep, utc(2027, 3, 9, 15, 0)) == "due"
    assert classify_due(prep, utc(2027, 3, 9, 15, 0, 1)) == "missed"
    open_ended = PlannedStep("x", "prep-guide", utc(2027, 1, 1), "UTC", None, "procedure")
    assert classify_due(open_ended, utc(2030, 1, 1)) == "due"
    with pytest.raises(ValueError):
        classify_due(prep, datetime(2027, 3, 6, 15, 0))


def test_other_shipped_plans_schedule(hip: CarePlan) -> None:
    plans = load_care_plans(REPO / "rules", REPO / "templates")
    dental = by_id(compute_schedule(plans["dental-implants"], case()))
    # 21 calendar days before 2027-03-20 (Chicago) is 02-27, CST: 09:00 = 15:00Z.
    assert dental["prep-guide"].send_at_utc == utc(2027, 2, 27, 15, 0)
    # Aftercare counts from the procedure, day after at 10:00 in Istanbul (patient is there).
    assert (dental["aftercare-day-1"].send_at_utc, dental["aftercare-day-1"].timezone) == (
        utc(2027, 3, 21, 7, 0), "Europe/Istanbul")
    rhino = compute_schedule(plans["rhinoplasty"], case())
    assert len(rhino) == len(plans["rhinoplasty"].steps)
