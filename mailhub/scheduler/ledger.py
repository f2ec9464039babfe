"""The send ledger: one ``schedule`` row per case step, recomputed in one transaction, claimed
atomically before sending.

Rules this module keeps, whoever calls it:
- A row that is ``sent``, or that has a ``queue_source_id`` (it was handed to the outbound path),
  is never recomputed, cancelled or sent again: a reschedule can not make a step go out twice.
- ``reschedule_case`` works inside the caller's transaction (``cases set`` commits the case and
  its schedule together, or neither): nothing is ever half-scheduled.
- A due row is claimed (``claimed_by``/``claimed_at``) in its own short transaction, on
  PostgreSQL with ``FOR UPDATE SKIP LOCKED``, on SQLite under the database's write lock, so two
  instances never claim the same row; a claim older than ``STALE_CLAIM`` is taken over (the
  instance that held it crashed).

What to do with each row is decided by the pure ``diff_schedule``; the rest is database plumbing.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parseaddr
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import func, or_, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session as OrmSession
from sqlmodel import Session, select

from mailhub.errors import MailhubError, NotFound, RuleError
from mailhub.scheduler.plans import CarePlan, load_care_plans
from mailhub.scheduler.steps import CaseTimes, PlannedStep, classify_due, compute_schedule
from mailhub.store import audit
from mailhub.store.models import Case, Patient, ScheduleEntry, utcnow

log = logging.getLogger("mailhub.scheduler")

TERMINAL_CASE_STATUSES = frozenset({"closed", "cancelled"})
STALE_CLAIM = timedelta(minutes=10)
EVENT_FIELDS = {"procedure": "procedure_at", "discharge": "discharge_at",
                "return_home": "return_home_at", "arrival": "arrival_at"}


class SchedulingError(MailhubError):
    """A case can not be scheduled as it stands (no patient, ...); the message says why."""


class UnknownCarePlan(RuleError):
    """A case names a care plan that is not in rules/care-plans."""


# ---------------------------------------------------------------- the pure decision


@dataclass(frozen=True)
class Existing:
    """What the diff needs to know about a ledger row."""

    step: str
    status: str
    queue_source_id: str = ""
    send_at_utc: datetime | None = None
    valid_until_utc: datetime | None = None
    template: str = ""
    timezone: str = ""
    plan_version: str = ""


@dataclass(frozen=True)
class Change:
    action: Literal["insert", "update", "delete", "cancel"]
    step: str
    planned: PlannedStep | None = None


def is_frozen(row: Existing) -> bool:
    """Sent, or handed to the outbound path: never touched again."""
    return row.status == "sent" or bool(row.queue_source_id)


def _same(row: Existing, p: PlannedStep, plan_version: str) -> bool:
    return (row.send_at_utc == p.send_at_utc and row.valid_until_utc == p.valid_until_utc
            and row.template == p.template and row.timezone == p.timezone
            and row.plan_version == plan_version)


def diff_schedule(existing: Iterable[Existing], planned: Sequence[PlannedStep], *,
                  case_open: bool, now: datetime, plan_version: str = "") -> list[Change]:
    """What to do to the ledger so that it matches ``planned``.

    Open case: a planned step is inserted, or updated back to pending from pending, held or
    cancelled (from missed only while its new window is still open); a row whose step is no
    longer planned (anchor unset, plan changed) is deleted unless it is missed (kept: the
    coordinator was told). Closed case: pending and held rows are cancelled. Frozen rows
    (``is_frozen``) are never in the result. An unchanged pending row is left alone, so a
    claim in flight is not disturbed by an unrelated edit of the case.
    """
    by_step = {p.step_id: p for p in planned}
    changes: list[Change] = []
    seen: set[str] = set()
    for row in existing:
        seen.add(row.step)
        if is_frozen(row):
            continue
        if not case_open:
            if row.status in ("pending", "held"):
                changes.append(Change("cancel", row.step))
            continue
        p = by_step.get(row.step)
        if p is None:
            if row.status != "missed":
                changes.append(Change("delete", row.step))
            continue
        if row.status == "missed":
            if p.valid_until_utc is not None and p.valid_until_utc <= now:
                continue
        elif row.status == "pending" and _same(row, p, plan_version):
            continue
        changes.append(Change("update", row.step, p))
    if case_open:
        changes.extend(Change("insert", p.step_id, p) for p in planned if p.step_id not in seen)
    return changes


# ---------------------------------------------------------------- plans and case data


class _PlanCache:
    """Care plans of one rules folder, loaded again when a plan file changes."""

    def __init__(self) -> None:
        self.stamp: tuple[Any, ...] | None = None
        self.plans: dict[str, CarePlan] = {}

    def get(self, rules_dir: Path, templates_dir: Path) -> dict[str, CarePlan]:
        folder = Path(rules_dir) / "care-plans"
        files = sorted(folder.glob("*.toml")) if folder.is_dir() else []
        stamp = (str(rules_dir), str(templates_dir),
                 tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files))
        if stamp != self.stamp:
            self.plans = load_care_plans(Path(rules_dir), Path(templates_dir))
            self.stamp = stamp
        return self.plans


_PLAN_CACHES: weakref.WeakKeyDictionary[Any, _PlanCache] = weakref.WeakKeyDictionary()


def care_plans(hub: Any) -> dict[str, CarePlan]:
    """The hub's validated care plans (RuleError naming file and step if one is invalid)."""
    cache = _PLAN_CACHES.setdefault(hub, _PlanCache())
    return cache.get(hub.config.hub.rules_dir, hub.config.hub.templates_dir)


def case_open(case: Case) -> bool:
    return case.status not in TERMINAL_CASE_STATUSES and not case.merged_into


def case_times(case: Case, patient: Patient) -> CaseTimes:
    """A case's zones and events as the pure schedule code wants them."""
    events = {anchor: getattr(case, name) for anchor, name in EVENT_FIELDS.items()}
    return CaseTimes(home_tz=patient.timezone or "UTC", clinic_tz=case.procedure_tz or None,
                     events=events)


def plan_for(case: Case, plans: Mapping[str, CarePlan]) -> CarePlan | None:
    """The case's plan; None when it names none; UnknownCarePlan when it names a missing one."""
    name = (case.procedure or "").strip()
    if not name:
        return None
    plan = plans.get(name)
    if plan is None:
        known = ", ".join(sorted(plans)) or "none are installed"
        raise UnknownCarePlan(
            f"case {case.id} names care plan {name!r}, which does not exist",
            hint=f"set procedure to a plan in rules/care-plans ({known}), or add "
                 f"rules/care-plans/{name}.toml")
    return plan


# ---------------------------------------------------------------- recompute


@dataclass(frozen=True)
class RescheduleResult:
    case_id: str
    plan: str
    inserted: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    cancelled: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.inserted or self.updated or self.deleted or self.cancelled)


def _lock_case_rows(session: OrmSession, case_id: str) -> list[ScheduleEntry]:
    """The case's rows, locked against a concurrent claim/send for this transaction."""
    if session.get_bind().dialect.name == "sqlite":
        # take the write lock before reading, so what we read is what we overwrite
        session.execute(text("UPDATE schedule SET id = id WHERE case_id = :c"), {"c": case_id})
    stmt = (select(ScheduleEntry).where(ScheduleEntry.case_id == case_id)
            .with_for_update().execution_options(populate_existing=True))
    return list(session.scalars(stmt))


def _existing(row: ScheduleEntry) -> Existing:
    return Existing(row.step, row.status, row.queue_source_id, row.send_at_utc,
                    row.valid_until_utc, row.template, row.timezone, row.plan_version)


def _apply(row: ScheduleEntry, p: PlannedStep, plan: CarePlan, now: datetime) -> None:
    row.plan, row.plan_version, row.template, row.anchor = plan.name, plan.version, p.template, p.anchor
    row.send_at_utc, row.valid_until_utc, row.timezone = p.send_at_utc, p.valid_until_utc, p.timezone
    row.status, row.reason, row.claimed_by, row.claimed_at = "pending", "", "", None
    row.updated_at = now


def reschedule_case(session: OrmSession, hub: Any, case_id: str, *,
                    plans: Mapping[str, CarePlan] | None = None,
                    now: datetime | None = None, actor: str = "scheduler") -> RescheduleResult:
    """Recompute every not-yet-sent step of a case, in the caller's transaction (no commit).

    Call it after any change to a case's events, zones, plan, patient or status. Raises
    NotFound, UnknownCarePlan, SchedulingError or UnknownTimeZone with nothing written
    (the caller rolls back).
    """
    now = now or utcnow()
    case = session.get(Case, case_id)
    if case is None:
        raise NotFound(f"no case {case_id}", hint="see 'mailhub cases list'")
    is_open = case_open(case)
    plan = plan_for(case, care_plans(hub) if plans is None else plans) if is_open else None
    planned: list[PlannedStep] = []
    if plan is not None:
        patient = session.get(Patient, case.patient_id) if case.patient_id is not None else None
        if patient is None:
            raise SchedulingError(f"case {case_id} has no patient, so its care plan can not "
                                  "be scheduled", hint="open the case with its patient's details")
        planned = compute_schedule(plan, case_times(case, patient),
                                   hub.config.scheduler.quiet_hours)
    rows = {r.step: r for r in _lock_case_rows(session, case_id)}
    changes = diff_schedule([_existing(r) for r in rows.values()], planned, case_open=is_open,
                            now=now, plan_version=plan.version if plan else "")
    done: dict[str, list[str]] = {"insert": [], "update": [], "delete": [], "cancel": []}
    for ch in changes:
        row = rows.get(ch.step)
        if ch.action == "insert" and ch.planned is not None and plan is not None:
            row = ScheduleEntry(case_id=case_id, step=ch.step, send_at_utc=ch.planned.send_at_utc)
            _apply(row, ch.planned, plan, now)
            session.add(row)
        elif ch.action == "update" and row is not None and ch.planned is not None and plan:
            _apply(row, ch.planned, plan, now)
            session.add(row)
        elif ch.action == "delete" and row is not None:
            session.delete(row)
        elif ch.action == "cancel" and row is not None:
            row.status, row.claimed_by, row.claimed_at = "cancelled", "", None
            row.reason, row.updated_at = f"case {case.status or 'merged'}", now
            session.add(row)
        done[ch.action].append(ch.step)
    session.flush()
    result = RescheduleResult(case_id, plan.name if plan else "", tuple(done["insert"]),
                              tuple(done["update"]), tuple(done["delete"]), tuple(done["cancel"]))
    if result.changed:
        audit.append(session, actor, "scheduled", case_id=case_id, detail={
            "plan": result.plan, "plan_version": plan.version if plan else "",
            "inserted": list(result.inserted), "updated": list(result.updated),
            "deleted": list(result.deleted), "cancelled": list(result.cancelled)})
        log.info("case %s schedule: %d new, %d moved, %d removed, %d cancelled", case_id,
                 len(result.inserted), len(result.updated), len(result.deleted),
                 len(result.cancelled))
    return result


# ---------------------------------------------------------------- claims


@dataclass(frozen=True)
class Claim:
    """A claimed row: ``action`` is "send", "missed" (window closed) or "finish" (already
    spooled by a claim that did not complete: only its outcome is still to be recorded)."""

    id: int
    case_id: str
    step: str
    template: str
    timezone: str
    send_at_utc: datetime
    valid_until_utc: datetime | None
    queue_source_id: str
    claimed_by: str
    claimed_at: datetime
    attempts: int
    action: Literal["send", "missed", "finish"]


def lock_writes(session: OrmSession) -> None:
    if session.get_bind().dialect.name == "sqlite":
        session.execute(text("UPDATE schedule SET id = id WHERE id = -1"))  # the write lock


def _action(row: ScheduleEntry, now: datetime) -> Literal["send", "missed", "finish"]:
    if row.queue_source_id:
        return "finish"
    planned = PlannedStep(row.step, row.template, row.send_at_utc, row.timezone,
                          row.valid_until_utc, row.anchor)
    return "missed" if classify_due(planned, now) == "missed" else "send"


def claim_due(engine: Engine, now: datetime, instance_id: str, limit: int = 100, *,
              stale_after: timedelta = STALE_CLAIM) -> list[Claim]:
    """Claim up to ``limit`` pending rows due at ``now`` (unclaimed, or claimed long ago).

    ``now`` decides what is due; the claim itself is stamped with the real clock, since
    crash recovery is about real time.
    """
    stamp = utcnow()
    with Session(engine, expire_on_commit=False) as session:
        lock_writes(session)
        stmt = (select(ScheduleEntry)
                .where(ScheduleEntry.status == "pending", ScheduleEntry.send_at_utc <= now)
                .where(or_(ScheduleEntry.claimed_at.is_(None),  # type: ignore[union-attr]
                           ScheduleEntry.claimed_at < stamp - stale_after))
                .order_by(ScheduleEntry.send_at_utc, ScheduleEntry.id)  # type: ignore[arg-type]
                .limit(limit))
        if engine.dialect.name == "postgresql":
            stmt = stmt.with_for_update(skip_locked=True)
        claims = []
        for row in session.scalars(stmt):
            if row.claimed_by:
                log.warning("schedule row %s (case %s, step %s): taking over a stale claim by "
                            "%s", row.id, row.case_id, row.step, row.claimed_by)
            row.claimed_by, row.claimed_at, row.attempts = instance_id, stamp, row.attempts + 1
            session.add(row)
            claims.append(Claim(row.id or 0, row.case_id, row.step, row.template, row.timezone,
                                row.send_at_utc, row.valid_until_utc, row.queue_source_id,
                                instance_id, stamp, row.attempts, _action(row, now)))
        session.commit()
    return claims


def lock_claimed(session: OrmSession, claim: Claim) -> ScheduleEntry | None:
    """The row, locked for this transaction, if it is still ours and still pending."""
    lock_writes(session)
    stmt = (select(ScheduleEntry).where(ScheduleEntry.id == claim.id).with_for_update()
            .execution_options(populate_existing=True))
    row = session.scalars(stmt).first()
    if (row is None or row.status != "pending" or row.claimed_by != claim.claimed_by
            or row.claimed_at != claim.claimed_at):
        return None
    return row


def release(engine: Engine, claim: Claim) -> None:
    """Give a claim back (the step is not due after all, e.g. moved by a reschedule)."""
    with Session(engine) as session:
        row = lock_claimed(session, claim)
        if row is not None:
            row.claimed_by, row.claimed_at = "", None
            session.add(row)
        session.commit()


def next_due(engine: Engine) -> datetime | None:
    """When the earliest unclaimed pending row is due (an index lookup, cheap at any size)."""
    with Session(engine) as session:
        return session.scalar(select(func.min(ScheduleEntry.send_at_utc)).where(
            ScheduleEntry.status == "pending", ScheduleEntry.claimed_by == ""))


# ---------------------------------------------------------------- lookups for other modules


def consent_for(session: OrmSession, address: str) -> bool:
    """True when a patient with this address recorded consent to plain email on an open case.

    For the outbound policy's ``RecipientContext.consent_plain_email``.
    """
    addr = parseaddr(address)[1].strip().lower()
    if not addr:
        return False
    stmt = (select(Case).join(Patient, Case.patient_id == Patient.id)  # type: ignore[arg-type]
            .where(func.lower(Patient.email) == addr, Case.consent_plain_email == True))  # noqa: E712
    return any(case_open(c) for c in session.scalars(stmt))
