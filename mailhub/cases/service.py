"""Case operations behind ``mailhub cases``: open, set fields and events, merge.

Every function runs in the caller's transaction and records what it changed in the audit log.
``set_fields`` validates every ``KEY=VALUE`` first and changes nothing unless all are valid.
Case events are wall-clock times in a zone (``procedure_at=2026-12-03T08:00`` with
``procedure_tz=Europe/Istanbul``); stored as the UTC instant, the zone and the local text.
Reading case files out (``cases list``, ``show``, ``export``) is in ``export.py``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from mailhub.cases.ids import allocate_case_id
from mailhub.cases.store import add_participants
from mailhub.cases.subjects import canonical_case_id
from mailhub.errors import MailhubError, NotFound
from mailhub.parse.headers import normalize_address, strip_crlf
from mailhub.scheduler.timecalc import event_instant, get_zone, is_valid_zone
from mailhub.store import audit
from mailhub.store.models import Case, MessageRef, Participant, Patient, StoredMessage, utcnow

log = logging.getLogger("mailhub.cases")

STATUSES = ("inquiry", "pre-op", "travel", "procedure", "recovery", "closed")
EVENTS = ("procedure", "arrival", "discharge", "return_home")
TEXT_KEYS = ("clinic", "coordinator", "language", "timezone", "procedure", "patient_name",
             "patient_email")
KEYS = (*(f"{e}_at" for e in EVENTS), *(f"{e}_tz" for e in EVENTS), "status",
        "consent_plain_email", *TEXT_KEYS)
_LANGUAGE = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{1,8}){0,3}")
_YES, _NO = ("yes", "true", "1", "on"), ("no", "false", "0", "off")
_CLEAR = ("", "none", "-")
MAX_TEXT = 200


class CaseInputError(MailhubError):
    """A ``cases`` command got values it cannot use; the message lists every problem."""


def get_case(session: Session, case_id: str) -> Case:
    """The case named ``case_id`` (spacing and case tolerated), else NotFound."""
    cid = canonical_case_id(case_id)
    case = session.get(Case, cid) if cid else None
    if case is None:
        raise NotFound(f"no case {case_id!r}", hint="list cases with 'mailhub cases list'")
    return case


def patient_of(session: Session, case: Case) -> Patient:
    patient = session.get(Patient, case.patient_id) if case.patient_id is not None else None
    return patient or Patient(name="", email="")


def case_patient(session: Session, case_id: str) -> Patient:
    """The patient of the case ``case_id`` (an empty one when there is no such case)."""
    case = session.get(Case, case_id)
    return patient_of(session, case) if case is not None else Patient(name="", email="")


def _text(value: str, what: str, problems: list[str], *, required: bool = False) -> str:
    text = strip_crlf(value)
    if required and not text:
        problems.append(f"{what} is empty")
    if len(text) > MAX_TEXT:
        problems.append(f"{what} is longer than {MAX_TEXT} characters")
    return text


def _address(value: str, what: str, problems: list[str]) -> str:
    norm = normalize_address(value)
    if norm is None or "." not in norm.rpartition("@")[2] and not norm.endswith("@localhost"):
        problems.append(f"{what} {value!r} is not an e-mail address")
        return ""
    return norm


def _coordinator(value: str, problems: list[str]) -> str:
    """A coordinator's e-mail address (normalized), or a plain name when it has no ``@``."""
    if "@" in value:
        return _address(value, "coordinator", problems)
    return _text(value, "coordinator", problems)


def _zone(value: str, what: str, problems: list[str]) -> str:
    name = value.strip()
    if not is_valid_zone(name):
        problems.append(f"{what}: unknown time zone {name!r} (use an IANA name such as "
                        "Europe/Istanbul or America/Chicago)")
    return name


def _language(value: str, problems: list[str]) -> str:
    lang = value.strip()
    if not _LANGUAGE.fullmatch(lang):
        problems.append(f"language {value!r} is not a language tag such as en, de or pt-BR")
    return lang


def _fail_if(problems: list[str], hint: str) -> None:
    if problems:
        raise CaseInputError("; ".join(problems), hint=hint)


def create_case(session: Session, *, patient_name: str, patient_email: str, actor: str,
                timezone: str = "UTC", language: str = "en", procedure: str = "",
                clinic: str = "", coordinator: str = "", status: str = "inquiry",
                why: str = "opened") -> Case:
    """Insert a case and its patient (values already valid); audited as ``case-opened``."""
    email = normalize_address(patient_email) or ""
    patient = Patient(name=patient_name, email=email, timezone=timezone, language=language)
    session.add(patient)
    session.flush()
    case = Case(id=allocate_case_id(session), patient_id=patient.id, status=status,
                procedure=procedure, clinic=clinic, coordinator=coordinator)
    session.add(case)
    session.flush()
    if email:
        add_participants(session, case.id, {email: "patient"})
    if "@" in coordinator:
        add_participants(session, case.id, {coordinator: "coordinator"})
    audit.append(session, actor, "case-opened", case_id=case.id,
                 detail={"status": status, "how": why, "procedure": procedure, "clinic": clinic})
    return case


def open_case(session: Session, *, patient_name: str, patient_email: str, timezone: str,
              language: str, procedure: str, clinic: str, coordinator: str = "",
              status: str = "inquiry", actor: str) -> Case:
    """``cases open``: validate every value, then create the case."""
    problems: list[str] = []
    name = _text(patient_name, "patient name", problems, required=True)
    email = _address(patient_email, "patient e-mail", problems)
    zone = _zone(timezone, "timezone", problems)
    lang = _language(language, problems)
    plan = _text(procedure, "procedure", problems)
    where = _text(clinic, "clinic", problems)
    coord = _coordinator(coordinator, problems)
    if status not in STATUSES:
        problems.append(f"status {status!r} is not one of {', '.join(STATUSES)}")
    _fail_if(problems, "see 'mailhub cases open --help'")
    return create_case(session, patient_name=name, patient_email=email, timezone=zone,
                       language=lang, procedure=plan, clinic=where, coordinator=coord,
                       status=status, actor=actor)


def parse_pairs(pairs: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` arguments as a dict; unknown or repeated keys are errors."""
    out: dict[str, str] = {}
    problems: list[str] = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().lower().replace("-", "_")
        if not sep:
            problems.append(f"{pair!r} is not KEY=VALUE")
        elif key not in KEYS:
            problems.append(f"unknown key {key!r}")
        elif key in out:
            problems.append(f"{key} is given twice")
        else:
            out[key] = value
    if not pairs:
        problems.append("nothing to set")
    _fail_if(problems, "keys: " + ", ".join(KEYS))
    return out


def parse_local(value: str) -> datetime:
    """``2026-12-03T08:00`` (seconds and a UTC offset allowed); ValueError otherwise."""
    text = value.strip()
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}[T ]\d{1,2}:\d{2}(:\d{2}(\.\d{1,6})?)?"
                        r"(Z|[+-]\d{2}:?\d{2})?", text):
        raise ValueError("expected a date and time like 2026-12-03T08:00")
    text = re.sub(r"(?<=[T ])(\d):", r"0\1:", text, count=1)  # "T8:00": fromisoformat wants 08
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if not 1970 <= parsed.year <= 2200:
        raise ValueError("the year is out of range")
    return parsed


@dataclass
class SetResult:
    """What ``set_fields`` changed, notes for the user, and a schedule problem if any."""

    case_id: str
    changed: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    schedule_error: str | None = None


def _plan_events(case: Case, home: str, given: dict[str, str], problems: list[str],
                 notes: list[str]) -> dict[str, tuple[datetime | None, str, str]]:
    """New (instant, zone, local text) of every event the assignment touches."""
    zones = {e: (_zone(given[f"{e}_tz"], f"{e}_tz", problems) if f"{e}_tz" in given
                 else getattr(case, f"{e}_tz")) for e in EVENTS}
    out: dict[str, tuple[datetime | None, str, str]] = {}
    for event in ("procedure", "arrival", "discharge", "return_home"):
        at_key, tz_key = f"{event}_at", f"{event}_tz"
        if at_key not in given and tz_key not in given:
            continue
        zone = zones[event]
        if not zone:
            default = home if event in ("return_home", "procedure") else zones["procedure"] or home
            if at_key in given and given[at_key].strip().lower() not in _CLEAR:
                why = ("the patient's home zone" if default == home
                       else "the procedure's zone")
                notes.append(f"{event} is read in {default} ({why}); set {tz_key} to change it")
            zone = zones[event] = default
        local_text = getattr(case, f"{event}_local")
        if at_key in given:
            raw = given[at_key]
            if raw.strip().lower() in _CLEAR:
                out[event] = (None, zone if tz_key in given else "", "")
                continue
            try:
                wall = parse_local(raw)
            except ValueError as exc:
                problems.append(f"{at_key}={raw!r}: {exc}")
                continue
            if wall.tzinfo is not None and is_valid_zone(zone):
                wall = wall.astimezone(get_zone(zone)).replace(tzinfo=None)
            local_text = wall.isoformat(timespec="seconds")
        if not local_text or not is_valid_zone(zone):
            out[event] = (None, zone, local_text)
            continue
        try:
            instant = event_instant(datetime.fromisoformat(local_text), zone)
        except (MailhubError, ValueError) as exc:
            problems.append(f"{event}: {exc}")
            continue
        out[event] = (instant, zone, local_text)
    return out


def _validate(session: Session, case: Case, given: dict[str, str],
              notes: list[str]) -> dict[str, Any]:
    """Every new value, checked; raises CaseInputError listing all problems, changes nothing."""
    problems: list[str] = []
    patient = patient_of(session, case)
    new: dict[str, Any] = {}
    for key, value in given.items():
        if key == "status":
            if value.strip().lower() not in STATUSES:
                problems.append(f"status {value!r} is not one of {', '.join(STATUSES)}")
            new[key] = value.strip().lower()
        elif key == "consent_plain_email":
            v = value.strip().lower()
            if v not in _YES + _NO:
                problems.append(f"consent_plain_email={value!r}: use yes or no")
            new[key] = v in _YES
        elif key == "timezone":
            new[key] = _zone(value, "timezone", problems)
        elif key == "language":
            new[key] = _language(value, problems)
        elif key == "coordinator":
            new[key] = _coordinator(value, problems)
        elif key == "patient_email":
            new[key] = _address(value, "patient_email", problems)
        elif key in TEXT_KEYS:
            new[key] = _text(value, key, problems, required=key == "patient_name")
    home = new.get("timezone") or patient.timezone or "UTC"
    for event, plan in _plan_events(case, home, given, problems, notes).items():
        new[f"{event}_at"], new[f"{event}_tz"], new[f"{event}_local"] = plan
    _fail_if(problems, "nothing was changed; fix the values and run the command again")
    return new


def _reschedule(session: Session, hub: Any, case_id: str, actor: str) -> str | None:
    """Recompute the case's schedule in a savepoint; the error text when it cannot be.

    A failure (an unknown care plan, a broken rule file) rolls back only the schedule change:
    the case change stands and the caller reports the problem.
    """
    from mailhub.scheduler.ledger import reschedule_case

    try:
        with session.begin_nested():
            reschedule_case(session, hub, case_id, actor=actor)
    except MailhubError as exc:
        log.warning("case %s: schedule not updated: %s", case_id, exc)
        return str(exc)
    return None


def set_fields(session: Session, hub: Any, case_id: str, pairs: list[str], *,
               actor: str) -> SetResult:
    """``cases set ID KEY=VALUE...``: validate all, apply all, audit, reschedule."""
    given = parse_pairs(pairs)
    case = get_case(session, case_id)
    result = SetResult(case.id)
    new = _validate(session, case, given, result.notes)
    patient = patient_of(session, case)
    patient_keys = {"timezone": "timezone", "language": "language", "patient_name": "name",
                    "patient_email": "email"}
    for key, value in new.items():
        if key == "consent_plain_email":
            continue
        target, attr = (patient, patient_keys[key]) if key in patient_keys else (case, key)
        if getattr(target, attr) != value:
            setattr(target, attr, value)
            shown = "(changed)" if key in ("patient_name", "patient_email") else value
            result.changed[key] = shown.isoformat() if isinstance(shown, datetime) else shown
    if "consent_plain_email" in new and new["consent_plain_email"] != case.consent_plain_email:
        case.consent_plain_email = new["consent_plain_email"]
        case.consent_by, case.consent_at = actor, utcnow()
        result.changed["consent_plain_email"] = case.consent_plain_email
        audit.append(session, actor, "consent-changed", case_id=case.id,
                     detail={"consent_plain_email": case.consent_plain_email, "by": actor})
    if "patient_email" in result.changed and patient.email:
        add_participants(session, case.id, {patient.email: "patient"})
    if "@" in new.get("coordinator", "") and "coordinator" in result.changed:
        add_participants(session, case.id, {new["coordinator"]: "coordinator"})
    if not result.changed:
        result.notes.append("nothing changed")
        return result
    case.updated_at = utcnow()
    session.add_all([case, patient])
    session.flush()
    audit.append(session, actor, "case-updated", case_id=case.id,
                 detail={"fields": {k: v for k, v in result.changed.items()
                                    if k != "consent_plain_email"}})
    result.schedule_error = _reschedule(session, hub, case.id, actor)
    return result


def resolve_merged(session: Session, case_id: str) -> str:
    """Where a merged case's mail goes now (follows ``merged_into``)."""
    seen: set[str] = set()
    current = case_id
    while current not in seen:
        seen.add(current)
        target = session.execute(select(Case.merged_into).where(Case.id == current)).scalar()  # type: ignore[arg-type]
        if not target:
            return current
        current = target
    return current


def merged_targets(session: Session, case_ids: list[str]) -> dict[str, tuple[str, str]]:
    """Of ``case_ids``, those merged into another case: the case their mail lives in now and
    that case's patient name (for its IMAP folder)."""

    merged = session.execute(select(Case.id).where(  # type: ignore[call-overload]
        Case.id.in_(case_ids), Case.merged_into.is_not(None))).scalars().all()  # type: ignore[attr-defined,union-attr]
    out = {}
    for case_id in merged:
        into = resolve_merged(session, case_id)
        out[case_id] = (into, case_patient(session, into).name)
    return out


def merge_cases(session: Session, hub: Any, source_id: str, into_id: str, *,
                actor: str) -> dict[str, Any]:
    """``cases merge SOURCE INTO``: messages and participants move; SOURCE closes, merged."""
    source, into = get_case(session, source_id), get_case(session, into_id)
    if source.id == into.id:
        raise CaseInputError(f"cannot merge {source.id} into itself")
    if source.merged_into:
        raise CaseInputError(f"{source.id} was already merged into {source.merged_into}")
    if into.merged_into:
        raise CaseInputError(f"{into.id} was merged into {into.merged_into}",
                             hint=f"merge into {resolve_merged(session, into.id)} instead")
    moved = session.execute(update(StoredMessage).where(StoredMessage.case_id == source.id)
                            .values(case_id=into.id)).rowcount
    session.execute(update(MessageRef).where(MessageRef.case_id == source.id)
                    .values(case_id=into.id))
    parts = session.execute(select(Participant).where(Participant.case_id == source.id)).scalars()
    roles = {p.address: p.role for p in parts}
    joined = add_participants(session, into.id, {a: ("other" if r == "patient" else r)
                                                 for a, r in roles.items()})
    session.execute(Participant.__table__.delete().where(  # type: ignore[attr-defined]
        Participant.__table__.c.case_id == source.id))  # type: ignore[attr-defined]
    previous = source.status
    source.status, source.merged_into, source.updated_at = "closed", into.id, utcnow()
    into.updated_at = utcnow()
    session.add_all([source, into])
    session.flush()
    detail = {"into": into.id, "messages": int(moved or 0), "participants": joined,
              "previous_status": previous}
    audit.append(session, actor, "case-merged", case_id=source.id, detail=detail)
    audit.append(session, actor, "case-merged", case_id=into.id,
                 detail={"from": source.id, "messages": int(moved or 0)})
    problems = [e for e in (_reschedule(session, hub, source.id, actor),
                            _reschedule(session, hub, into.id, actor)) if e]
    return {"source": source.id, "into": into.id, "messages_moved": int(moved or 0),
            "participants_added": joined, "schedule_error": "; ".join(problems) or None}
