"""The send ledger: recompute in the caller's transaction, never touching sent rows; claims.

Expected instants are computed with zoneinfo (sched_support.wall), not with the pytz code under
test. The scenario: a patient in Chicago, surgery in Istanbul (no DST since 2016) in March 2027,
when Chicago moves from CST (UTC-6) to CDT (UTC-5) on Sunday 14 March.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlmodel import Session

from mailhub.cli.cmd_schedule import schedule_list
from mailhub.errors import MailhubError
from mailhub.scheduler.ledger import (
    Existing,
    UnknownCarePlan,
    claim_due,
    consent_for,
    diff_schedule,
    next_due,
    reschedule_case,
)
from mailhub.scheduler.steps import PlannedStep
from mailhub.store.models import Case, ScheduleEntry
from tests.scheduler.sched_support import light_hub, make_case, rows, set_events, wall

CHI, IST = "America/Chicago", "Europe/Istanbul"
EVENTS = {
    "arrival": ("2027-03-17T22:30", IST),
    "procedure": ("2027-03-20T08:00", IST),
    "discharge": ("2027-03-24T11:00", IST),
    "return_home": ("2027-03-27T14:00", CHI),
}
BEFORE = datetime(2027, 1, 10, tzinfo=UTC)


def expected_march() -> dict[str, tuple[datetime, str]]:
    """step -> (UTC instant, zone), worked out by hand from the plan and the brief's rules."""
    return {
        "prep-guide": (wall("2027-03-06T09:00", CHI), CHI),  # -14d at 09:00 home, CST
        "travel-checklist": (wall("2027-03-13T09:00", CHI), CHI),  # last CST day
        # arrival 22:30 + 2h = 00:30 in quiet hours (21-08) -> 08:00 next morning, clinic zone
        "arrival-welcome": (wall("2027-03-18T08:00", IST), IST),
        "fasting-instructions": (wall("2027-03-19T18:00", IST), IST),
        # discharge +1d at 10:00 "current": still in Istanbul (before return_home)
        "wound-care-day-1": (wall("2027-03-25T10:00", IST), IST),
        "follow-up-day-7": (wall("2027-04-03T10:00", CHI), CHI),  # CDT
        "follow-up-day-30": (wall("2027-04-26T10:00", CHI), CHI),
        "follow-up-day-90": (wall("2027-06-25T10:00", CHI), CHI),
    }


@pytest.fixture
def hub(short_tmp: Path):  # type: ignore[no-untyped-def]
    return light_hub(short_tmp / "hub")


def _open_case(hub, events=EVENTS, **kw):  # type: ignore[no-untyped-def]
    with Session(hub.engine) as session:
        make_case(session, events=events, **kw)
        result = reschedule_case(session, hub, kw.get("case_id", "MT-2027-0001"), now=BEFORE)
        session.commit()
    return result


def _set(hub, case_id: str, now: datetime = BEFORE, **changes):  # type: ignore[no-untyped-def]
    with Session(hub.engine) as session:
        case = session.get(Case, case_id)
        events = {k: v for k, v in changes.items() if isinstance(v, tuple)}
        set_events(case, events)
        for k, v in changes.items():
            if not isinstance(v, tuple):
                setattr(case, k, v)
        session.add(case)
        result = reschedule_case(session, hub, case_id, now=now)
        session.commit()
    return result


def test_chicago_patient_istanbul_surgery_across_march_dst(hub) -> None:  # type: ignore[no-untyped-def]
    result = _open_case(hub)
    expected = expected_march()
    assert set(result.inserted) == set(expected)
    with Session(hub.engine) as session:
        listed = schedule_list(session, "MT-2027-0001")
    assert [r["step"] for r in listed] == sorted(expected, key=lambda s: expected[s][0])
    for r in listed:
        instant, zone = expected[r["step"]]
        assert datetime.fromisoformat(r["send_at_utc"]) == instant, r["step"]
        assert r["timezone"] == zone and r["status"] == "pending"
        local = datetime.fromisoformat(r["send_at_local"])
        assert local == instant  # the same instant, written with its offset
        assert local.utcoffset() == instant.astimezone(ZoneInfo(zone)).utcoffset()
        assert set(r) >= {"case", "step", "template", "send_at_utc", "send_at_local", "timezone",
                          "status"}
    by = {r["step"]: r for r in listed}
    assert by["prep-guide"]["send_at_local"] == "2027-03-06T09:00:00-06:00"
    assert by["travel-checklist"]["send_at_local"] == "2027-03-13T09:00:00-06:00"
    assert by["follow-up-day-7"]["send_at_local"] == "2027-04-03T10:00:00-05:00"
    assert by["arrival-welcome"]["send_at_local"] == "2027-03-18T08:00:00+03:00"
    assert by["wound-care-day-1"]["template"] == "wound-care"


def test_moving_the_surgery_moves_pending_steps_across_dst(hub) -> None:  # type: ignore[no-untyped-def]
    _open_case(hub)
    result = _set(hub, "MT-2027-0001", procedure=("2027-04-10T08:00", IST))
    assert set(result.updated) == {"prep-guide", "travel-checklist", "fasting-instructions"}
    got = rows(hub)
    # three weeks later: the prep guide now falls after the change to CDT, still at 09:00
    assert got["prep-guide"].send_at_utc == wall("2027-03-27T09:00", CHI)
    assert got["prep-guide"].send_at_utc.hour == 14  # was 15:00 UTC under CST
    assert got["travel-checklist"].send_at_utc == wall("2027-04-03T09:00", CHI)
    assert got["fasting-instructions"].send_at_utc == wall("2027-04-09T18:00", IST)
    assert got["follow-up-day-7"].send_at_utc == expected_march()["follow-up-day-7"][0]  # unmoved


def test_unset_anchor_removes_pending_step_and_unchanged_edit_keeps_claims(hub) -> None:  # type: ignore[no-untyped-def]
    _open_case(hub)
    claims = claim_due(hub.engine, wall("2027-03-06T09:30", CHI), "A")
    assert [c.step for c in claims] == ["prep-guide"]
    result = _set(hub, "MT-2027-0001", return_home=("", CHI))
    assert set(result.deleted) == {"follow-up-day-7", "follow-up-day-30", "follow-up-day-90"}
    got = rows(hub)
    assert "follow-up-day-7" not in got
    assert got["prep-guide"].claimed_by == "A"  # untouched: nothing about it changed
    # with no return home set, "current" means home: day-1 wound care moves to Chicago
    assert got["wound-care-day-1"].timezone == CHI
    assert got["wound-care-day-1"].send_at_utc == wall("2027-03-25T10:00", CHI)


def test_sent_step_is_never_recomputed_and_closing_cancels(hub) -> None:  # type: ignore[no-untyped-def]
    _open_case(hub)
    with Session(hub.engine) as session:
        row = session.get(ScheduleEntry, rows(hub)["prep-guide"].id)
        row.status, row.queue_source_id = "sent", f"sched-{row.id}"
        session.add(row)
        handed = session.get(ScheduleEntry, rows(hub)["travel-checklist"].id)
        handed.queue_source_id = f"sched-{handed.id}"  # spooled, not yet marked: frozen too
        session.add(handed)
        session.commit()
    result = _set(hub, "MT-2027-0001", procedure=("2027-05-01T08:00", IST))
    assert "prep-guide" not in result.updated and "travel-checklist" not in result.updated
    got = rows(hub)
    assert got["prep-guide"].status == "sent"
    assert got["prep-guide"].send_at_utc == wall("2027-03-06T09:00", CHI)
    assert got["travel-checklist"].send_at_utc == wall("2027-03-13T09:00", CHI)

    result = _set(hub, "MT-2027-0001", status="closed")
    got = rows(hub)
    assert got["prep-guide"].status == "sent"
    assert got["travel-checklist"].status == "pending"  # in the outbound path already
    cancelled = {s for s, r in got.items() if r.status == "cancelled"}
    assert cancelled == set(result.cancelled) == set(expected_march()) - {"prep-guide",
                                                                            "travel-checklist"}
    assert all("closed" in got[s].reason for s in cancelled)
    # nothing cancelled is ever claimed
    assert [c.step for c in claim_due(hub.engine, datetime(2028, 1, 1, tzinfo=UTC), "A")] == \
        ["travel-checklist"]


def test_unknown_plan_is_a_clear_error_and_writes_nothing(hub) -> None:  # type: ignore[no-untyped-def]
    _open_case(hub)
    before = {s: (r.send_at_utc, r.status) for s, r in rows(hub).items()}
    with Session(hub.engine) as session:
        case = session.get(Case, "MT-2027-0001")
        case.procedure = "knee-teleportation"
        set_events(case, {"procedure": ("2027-06-01T08:00", IST)})
        session.add(case)
        with pytest.raises(UnknownCarePlan) as info:
            reschedule_case(session, hub, "MT-2027-0001", now=BEFORE)
        session.rollback()
    assert "knee-teleportation" in str(info.value) and "MT-2027-0001" in str(info.value)
    assert "hip-replacement" in (info.value.hint or "")
    assert {s: (r.send_at_utc, r.status) for s, r in rows(hub).items()} == before


def test_bad_zone_on_the_patient_is_a_clear_error(hub) -> None:  # type: ignore[no-untyped-def]
    with Session(hub.engine) as session:
        make_case(session, events=EVENTS, home_tz="Mars/Olympus_Mons")
        with pytest.raises(MailhubError, match="Mars/Olympus_Mons"):
            reschedule_case(session, hub, "MT-2027-0001", now=BEFORE)
        session.rollback()
    assert rows(hub) == {}


def test_claims_are_exclusive_and_stale_claims_are_taken_over(hub) -> None:  # type: ignore[no-untyped-def]
    _open_case(hub)
    at = wall("2027-03-13T09:30", CHI)  # prep-guide (window closed) and travel-checklist due
    first = claim_due(hub.engine, at, "A")
    assert {c.step: c.action for c in first} == {"prep-guide": "missed",
                                                 "travel-checklist": "send"}
    assert claim_due(hub.engine, at, "B") == []
    assert next_due(hub.engine) == expected_march()["arrival-welcome"][0]
    taken = claim_due(hub.engine, at, "B", stale_after=timedelta(0))
    assert {c.step for c in taken} == {"prep-guide", "travel-checklist"}
    assert all(c.claimed_by == "B" and c.attempts == 2 for c in taken)


def test_diff_is_pure_and_keeps_frozen_and_missed_rows() -> None:
    now = datetime(2027, 1, 1, tzinfo=UTC)
    t = datetime(2027, 2, 1, tzinfo=UTC)
    planned = [PlannedStep("a", "x", t, "UTC", t + timedelta(days=1), "procedure"),
               PlannedStep("b", "x", t, "UTC", None, "procedure"),
               PlannedStep("new", "x", t, "UTC", None, "procedure")]
    existing = [Existing("a", "missed"), Existing("b", "held"), Existing("gone", "pending"),
                Existing("old-miss", "missed"), Existing("s", "sent"),
                Existing("q", "pending", queue_source_id="sched-9")]
    changes = {(c.action, c.step) for c in diff_schedule(existing, planned, case_open=True,
                                                         now=now)}
    assert changes == {("update", "a"), ("update", "b"), ("delete", "gone"), ("insert", "new")}
    late = diff_schedule([Existing("a", "missed")], planned[:1], case_open=True,
                         now=t + timedelta(days=2))
    assert late == []  # its new window is closed too: stays missed
    closed = diff_schedule(existing, planned, case_open=False, now=now)
    assert {(c.action, c.step) for c in closed} == {("cancel", "b"), ("cancel", "gone")}


def test_consent_lookup(hub) -> None:  # type: ignore[no-untyped-def]
    with Session(hub.engine) as session:
        make_case(session, "MT-2027-0002", email="Consenting@Patient.example", events=EVENTS)
        case = session.get(Case, "MT-2027-0002")
        case.consent_plain_email = True
        make_case(session, "MT-2027-0003", email="other@patient.example", events=EVENTS)
        session.commit()
        assert consent_for(session, "Ana <consenting@patient.example>")
        assert not consent_for(session, "other@patient.example")
        assert not consent_for(session, "nobody@patient.example")
        case.status = "closed"
        session.add(case)
        session.commit()
        assert not consent_for(session, "consenting@patient.example")
