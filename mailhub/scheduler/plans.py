"""Care plans: load and validate every ``rules/care-plans/*.toml`` once, at start.

A plan that would fail at send time (unknown anchor, bad duration, missing template) fails here
instead, with a RuleError naming the file and the step, so an administrator finds out on
``mailhub serve`` rather than the night a patient's fasting instructions were due.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tomllib
from dataclasses import dataclass
from datetime import time
from pathlib import Path
from typing import Any

from mailhub.errors import RuleError
from mailhub.scheduler.durations import Duration, parse_duration
from mailhub.scheduler.timecalc import STEP_ZONES, parse_clock

log = logging.getLogger("mailhub.scheduler")

ANCHORS = ("procedure", "discharge", "return_home", "arrival")
PLAN_KEYS = {"name", "description", "step"}
STEP_KEYS = {"id", "template", "anchor", "offset", "local_time", "zone", "valid_for"}
REQUIRED_STEP_KEYS = ("id", "template", "anchor", "offset")
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_TEMPLATE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
FALLBACK_LANGUAGE = "en"


@dataclass(frozen=True)
class Step:
    """One message of a plan, timed relative to a case event."""

    id: str
    template: str
    anchor: str
    offset: Duration
    local_time: time | None = None
    zone: str = "current"
    valid_for: Duration | None = None


@dataclass(frozen=True)
class CarePlan:
    """A validated plan; ``version`` (short sha256 of the file) lets schedules note what made them."""

    name: str
    steps: tuple[Step, ...]
    source_path: Path
    version: str
    description: str = ""

    def step(self, step_id: str) -> Step:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)


def _fail(path: Path, message: str, *, step: str | None = None, hint: str | None = None) -> RuleError:
    where = f"{path}" + (f", step {step!r}" if step is not None else "")
    return RuleError(f"{where}: {message}", hint=hint)


def _str_field(path: Path, data: dict[str, Any], key: str, step: str | None) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, f"'{key}' must be a non-empty string", step=step)
    return value.strip()


def _parse_step(path: Path, index: int, data: Any, templates_dir: Path) -> Step:
    label = f"#{index + 1}"
    if not isinstance(data, dict):
        raise _fail(path, f"step {label} is not a table", hint="write each step as [[step]]")
    if isinstance(data.get("id"), str) and data["id"].strip():
        label = data["id"].strip()
    unknown = sorted(set(data) - STEP_KEYS)
    if unknown:
        raise _fail(path, f"unknown key(s) {', '.join(unknown)}", step=label,
                    hint=f"a step takes {', '.join(sorted(STEP_KEYS))}")
    for key in REQUIRED_STEP_KEYS:
        if key not in data:
            raise _fail(path, f"'{key}' is missing", step=label)
    step_id = _str_field(path, data, "id", label)
    if not _NAME.fullmatch(step_id):
        raise _fail(path, "the id must be lower-case letters, digits, '.', '_' or '-'", step=label)
    template = _str_field(path, data, "template", step_id)
    if not _TEMPLATE.fullmatch(template):
        raise _fail(path, f"template {template!r} is not a plain template name", step=step_id,
                    hint="letters, digits, '_' and '-' only, e.g. \"prep-guide\"")
    anchor = _str_field(path, data, "anchor", step_id)
    if anchor not in ANCHORS:
        raise _fail(path, f"unknown anchor {anchor!r}", step=step_id,
                    hint=f"use one of {', '.join(ANCHORS)}")
    offset = _duration(path, step_id, "offset", data["offset"])
    local_time = None
    if "local_time" in data:
        raw = data["local_time"]
        try:
            if isinstance(raw, time) and raw.second == 0 and raw.microsecond == 0:
                local_time = raw.replace(tzinfo=None)  # TOML's own 09:00:00 literal
            else:
                local_time = parse_clock(raw)
        except ValueError:
            raise _fail(path, f"local_time = {raw!r} is not a 24-hour time", step=step_id,
                        hint='e.g. "09:00" or "18:30"') from None
        if offset.seconds:
            log.info("%s step %s: local_time set, so only the offset's whole days count",
                     path.name, step_id)
    zone = data.get("zone", "current")
    if zone not in STEP_ZONES:
        raise _fail(path, f"unknown zone {zone!r}", step=step_id,
                    hint=f"use one of {', '.join(STEP_ZONES)}")
    valid_for = None
    if "valid_for" in data:
        valid_for = _duration(path, step_id, "valid_for", data["valid_for"])
        if valid_for.total_seconds <= 0:
            raise _fail(path, f"valid_for = {data['valid_for']!r} must be positive", step=step_id)
    _check_template(path, step_id, template, templates_dir)
    return Step(step_id, template, anchor, offset, local_time, zone, valid_for)


def _duration(path: Path, step_id: str, key: str, raw: Any) -> Duration:
    try:
        return parse_duration(raw, where=key)
    except RuleError as exc:
        raise _fail(path, exc.message, step=step_id, hint=exc.hint) from None


def _check_template(path: Path, step_id: str, template: str, templates_dir: Path) -> None:
    base = templates_dir / FALLBACK_LANGUAGE
    missing = [f"{FALLBACK_LANGUAGE}/{template}{suffix}" for suffix in (".subject.j2", ".txt.j2")
               if not (base / f"{template}{suffix}").is_file()]
    if missing:
        raise _fail(path, f"template {template!r} has no {' and no '.join(missing)} in {templates_dir}",
                    step=step_id, hint="every template needs at least an English subject and text")


def load_care_plan(path: Path, templates_dir: Path) -> CarePlan:
    """Load and validate one plan file."""
    try:
        raw_bytes = path.read_bytes()
    except OSError as exc:
        raise _fail(path, f"cannot read the file: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw_bytes.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise _fail(path, f"is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - PLAN_KEYS)
    if unknown:
        raise _fail(path, f"unknown key(s) {', '.join(unknown)}",
                    hint="a care plan has 'name', optional 'description' and [[step]] tables")
    name = _str_field(path, data, "name", None)
    if not _NAME.fullmatch(name):
        raise _fail(path, f"name {name!r} must be lower-case letters, digits, '.', '_' or '-'",
                    hint='e.g. name = "hip-replacement"')
    description = data.get("description", "")
    if not isinstance(description, str):
        raise _fail(path, "'description' must be a string")
    raw_steps = data.get("step", [])
    if not isinstance(raw_steps, list) or not raw_steps:
        raise _fail(path, "has no steps", hint="add at least one [[step]] table")
    steps: list[Step] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_steps):
        step = _parse_step(path, index, raw, templates_dir)
        if step.id in seen:
            raise _fail(path, "the id is used by an earlier step", step=step.id,
                        hint="give every step of a plan its own id")
        seen.add(step.id)
        steps.append(step)
    version = hashlib.sha256(raw_bytes).hexdigest()[:12]
    return CarePlan(name, tuple(steps), path, version, description)


def load_care_plans(rules_dir: Path, templates_dir: Path) -> dict[str, CarePlan]:
    """Every plan under ``rules_dir/care-plans``, by name; a missing folder means no plans."""
    folder = Path(rules_dir) / "care-plans"
    plans: dict[str, CarePlan] = {}
    if not folder.is_dir():
        log.info("no care plans: %s does not exist", folder)
        return plans
    for path in sorted(folder.glob("*.toml")):
        plan = load_care_plan(path, Path(templates_dir))
        if plan.name in plans:
            raise _fail(path, f"plan name {plan.name!r} is also used by {plans[plan.name].source_path}",
                        hint="give every care plan its own name")
        plans[plan.name] = plan
    log.info("loaded %d care plan(s) from %s", len(plans), folder)
    return plans
