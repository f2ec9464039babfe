"""Helpers for the scheduler runtime tests: a light hub (no gpg), cases written straight into the
store, and expected instants computed with the standard library's zoneinfo (independently of the
pytz code under test)."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from sqlmodel import Session, select

from mailhub.app import Hub
from mailhub.config import load_config
from mailhub.crypto.atrest import generate_atrest_key
from mailhub.store.models import Case, OutboundItem, Patient, ScheduleEntry

REPO = Path(__file__).resolve().parents[2]
COORD = "sam@medvoyage.example"


def wall(text: str, zone: str) -> datetime:
    """A wall-clock time in a zone as a UTC instant (zoneinfo; fold=0 is the first occurrence)."""
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).astimezone(UTC)


def light_hub(root: Path, *, database_url: str = "", rules_dir: Path | None = None,
              templates_dir: Path | None = None, quiet_hours: str = "21:00-08:00",
              smarthost_port: int = 2526) -> Hub:
    """A hub with a database, spool and at-rest key but no gpg keys (held mail needs none)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "keys").mkdir(mode=0o700, exist_ok=True)
    generate_atrest_key(root / "keys" / "atrest.key")
    cfg = root / "config.toml"
    cfg.write_text(f"""
[hub]
domain = "medvoyage.example"
data_dir = "var"
database_url = "{database_url}"
keys_dir = "keys"
rules_dir = "{rules_dir or REPO / 'rules'}"
templates_dir = "{templates_dir or REPO / 'templates'}"

[delivery]
smarthost = "127.0.0.1:{smarthost_port}"

[scheduler]
quiet_hours = "{quiet_hours}"
check_interval = 60
""")
    hub = Hub(load_config(cfg))
    hub.migrate()
    return hub


def custom_rules(root: Path, plan_toml: str) -> Path:
    """A rules folder with the shipped policy and one extra care plan."""
    rules = root / "rules"
    (rules / "care-plans").mkdir(parents=True)
    shutil.copy(REPO / "rules" / "policy.toml", rules / "policy.toml")
    (rules / "care-plans" / "test-plan.toml").write_text(plan_toml)
    return rules


def make_case(session: Session, case_id: str = "MT-2027-0001", *,
              plan: str = "hip-replacement", home_tz: str = "America/Chicago",
              language: str = "en", email: str = "alex@patient.example",
              clinic_tz: str = "Europe/Istanbul", status: str = "pre-op",
              events: dict[str, tuple[str, str]] | None = None) -> Case:
    """A case and its patient; ``events`` maps anchor -> (local wall time, zone)."""
    patient = Patient(name="Alex Example", email=email, timezone=home_tz, language=language)
    session.add(patient)
    session.flush()
    case = Case(id=case_id, patient_id=patient.id, status=status, procedure=plan,
                clinic="Anatolia Orthopaedic Clinic", coordinator=f"Sam Rivera <{COORD}>",
                procedure_tz=clinic_tz)
    set_events(case, events or {})
    session.add(case)
    session.flush()
    return case


def set_events(case: Case, events: dict[str, tuple[str, str]]) -> None:
    for anchor, (text, zone) in events.items():
        setattr(case, f"{anchor}_at", wall(text, zone) if text else None)
        setattr(case, f"{anchor}_tz", zone)
        setattr(case, f"{anchor}_local", text)


def rows(hub: Hub, case_id: str | None = None) -> dict[str, ScheduleEntry]:
    with Session(hub.engine) as session:
        stmt = select(ScheduleEntry)
        if case_id:
            stmt = stmt.where(ScheduleEntry.case_id == case_id)
        return {r.step: r for r in session.exec(stmt)}


def outbound(hub: Hub) -> list[OutboundItem]:
    with Session(hub.engine) as session:
        return list(session.exec(select(OutboundItem).order_by(OutboundItem.id)))  # type: ignore[arg-type]
