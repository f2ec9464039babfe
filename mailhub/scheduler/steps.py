"""From a care plan and a case's events to concrete send instants: plain data in, plain data out.

The scheduler's runtime (job store, firing, sending) lives elsewhere and only calls these, so
every timing decision can be tested without a clock, a database or a mail server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from mailhub.scheduler.plans import CarePlan, Step
from mailhub.scheduler.timecalc import DEFAULT_QUIET_HOURS, send_time, target_zone

DueState = Literal["due", "pending", "missed"]


@dataclass(frozen=True)
class CaseTimes:
    """What a schedule depends on: the two zones and the events (anchor name -> UTC or None)."""

    home_tz: str
    clinic_tz: str | None
    events: dict[str, datetime | None] = field(default_factory=dict)

    def event(self, anchor: str) -> datetime | None:
        value = self.events.get(anchor)
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"case event {anchor!r} is naive; pass it as a UTC instant")
        return value.astimezone(UTC)


@dataclass(frozen=True)
class PlannedStep:
    """One step of one case, placed in time."""

    step_id: str
    template: str
    send_at_utc: datetime
    timezone: str
    valid_until_utc: datetime | None
    anchor: str


@dataclass(frozen=True)
class Unscheduled:
    """A step that cannot be placed yet, and why (its anchor event is not set, ...)."""

    step_id: str
    reason: str


def place_step(
    step: Step,
    case: CaseTimes,
    quiet_hours: tuple[str, str] = DEFAULT_QUIET_HOURS,
) -> PlannedStep | Unscheduled:
    """Place one step, or say why it cannot be placed yet.

    For zone "current" the send time is first computed in the clinic's zone; when that instant
    lies in [arrival, return_home) the patient is at the clinic and it stands, otherwise the step
    is computed in the home zone. (The candidate send instant, not the anchor, decides: a day-1
    wound-care mail after discharge still reaches a patient who has not flown home yet.)
    """
    anchor = case.event(step.anchor)
    if anchor is None:
        return Unscheduled(step.id, f"the case has no {step.anchor} time yet")
    if step.zone == "clinic" and not case.clinic_tz:
        return Unscheduled(step.id, "the case has no procedure zone yet")
    if step.zone == "current" and case.clinic_tz:
        candidate = send_time(anchor, step.offset, step.local_time, case.clinic_tz, quiet_hours)
        zone = target_zone("current", case.home_tz, case.clinic_tz, candidate,
                           case.event("arrival"), case.event("return_home"))
        send_at = candidate if zone == case.clinic_tz else None
    else:
        zone = target_zone(step.zone, case.home_tz, case.clinic_tz, anchor, None, None)
        send_at = None
    if send_at is None:
        send_at = send_time(anchor, step.offset, step.local_time, zone, quiet_hours)
    valid_until = send_at + step.valid_for.as_timedelta() if step.valid_for else None
    return PlannedStep(step.id, step.template, send_at, zone, valid_until, step.anchor)


def compute_schedule(
    plan: CarePlan,
    case: CaseTimes,
    quiet_hours: tuple[str, str] = DEFAULT_QUIET_HOURS,
) -> list[PlannedStep]:
    """Every step whose anchor is set, in send order (plan order among equal times)."""
    placed = [place_step(step, case, quiet_hours) for step in plan.steps]
    planned = [p for p in placed if isinstance(p, PlannedStep)]
    return sorted(planned, key=lambda p: p.send_at_utc)


def unscheduled_steps(plan: CarePlan, case: CaseTimes) -> list[Unscheduled]:
    """The steps ``compute_schedule`` leaves out, each with the reason."""
    placed = [place_step(step, case) for step in plan.steps]
    return [p for p in placed if isinstance(p, Unscheduled)]


def classify_due(planned: PlannedStep, now: datetime) -> DueState:
    """"pending" before its time, "due" from then until its window closes, "missed" after.

    A step without ``valid_for`` never goes missed: it is sent late rather than not at all.
    """
    now_utc = now.astimezone(UTC) if now.tzinfo is not None else None
    if now_utc is None:
        raise ValueError("classify_due needs an aware 'now'")
    if now_utc < planned.send_at_utc:
        return "pending"
    if planned.valid_until_utc is not None and now_utc > planned.valid_until_utc:
        return "missed"
    return "due"
