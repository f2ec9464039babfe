"""Care plans are validated at load, with errors that name the file and the step."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mailhub.errors import RuleError
from mailhub.scheduler.plans import load_care_plans

REPO = Path(__file__).resolve().parents[2]
SHIPPED_RULES = REPO / "rules"
SHIPPED_TEMPLATES = REPO / "templates"

GOOD_STEP = """
[[step]]
id = "prep"
template = "prep-guide"
anchor = "procedure"
offset = "-14d"
local_time = "09:00"
zone = "home"
valid_for = "2d"
"""


@pytest.fixture()
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    rules = tmp_path / "rules"
    (rules / "care-plans").mkdir(parents=True)
    templates = tmp_path / "templates"
    (templates / "en").mkdir(parents=True)
    for suffix in (".subject.j2", ".txt.j2"):
        (templates / "en" / f"prep-guide{suffix}").write_text("x\n")
    return rules, templates


def write_plan(rules: Path, filename: str, body: str, name: str = "knee") -> Path:
    path = rules / "care-plans" / filename
    path.write_text(f'name = "{name}"\n{body}', encoding="utf-8")
    return path


def test_shipped_plans_load() -> None:
    plans = load_care_plans(SHIPPED_RULES, SHIPPED_TEMPLATES)
    assert {"hip-replacement", "dental-implants", "rhinoplasty"} <= set(plans)
    hip = plans["hip-replacement"]
    assert hip.source_path.name == "hip-replacement.toml"
    assert re.fullmatch(r"[0-9a-f]{12}", hip.version)
    prep = hip.step("prep-guide")
    assert (prep.anchor, prep.offset.days, prep.zone, str(prep.local_time)) == (
        "procedure", -14, "home", "09:00:00")
    fasting = hip.step("fasting-instructions")
    assert (fasting.zone, str(fasting.local_time), fasting.offset.days) == ("clinic", "18:00:00", -1)
    assert hip.step("wound-care-day-1").zone == "current"
    assert hip.step("follow-up-day-30").valid_for is not None


def test_shipped_templates_cover_every_step_in_en_es_de() -> None:
    plans = load_care_plans(SHIPPED_RULES, SHIPPED_TEMPLATES)
    for plan in plans.values():
        for step in plan.steps:
            for lang in ("en", "es", "de"):
                for suffix in (".subject.j2", ".txt.j2", ".html.j2"):
                    path = SHIPPED_TEMPLATES / lang / f"{step.template}{suffix}"
                    assert path.is_file(), f"{plan.name}/{step.id}: {path} missing"
    for suffix in (".subject.j2", ".txt.j2", ".html.j2"):
        assert (SHIPPED_TEMPLATES / "ar" / f"prep-guide{suffix}").is_file()


def test_minimal_plan_defaults(dirs: tuple[Path, Path]) -> None:
    rules, templates = dirs
    write_plan(rules, "knee.toml", '[[step]]\nid = "a"\ntemplate = "prep-guide"\nanchor = "arrival"\noffset = "+2h"\n')
    step = load_care_plans(rules, templates)["knee"].steps[0]
    assert (step.zone, step.local_time, step.valid_for, step.offset.seconds) == ("current", None, None, 7200)


def test_version_follows_file_content(dirs: tuple[Path, Path]) -> None:
    rules, templates = dirs
    path = write_plan(rules, "knee.toml", GOOD_STEP)
    first = load_care_plans(rules, templates)["knee"].version
    path.write_text(path.read_text() + "# a comment\n")
    assert load_care_plans(rules, templates)["knee"].version != first


def test_missing_folder_means_no_plans(tmp_path: Path) -> None:
    assert load_care_plans(tmp_path / "nowhere", tmp_path) == {}


@pytest.mark.parametrize(
    ("body", "step", "words"),
    [
        (GOOD_STEP + GOOD_STEP, "prep", "used by an earlier step"),
        (GOOD_STEP.replace('"procedure"', '"surgery"'), "prep", "unknown anchor 'surgery'"),
        (GOOD_STEP.replace('"-14d"', '"-14x"'), "prep", "offset"),
        (GOOD_STEP.replace('"2d"', '"-2d"'), "prep", "valid_for"),
        (GOOD_STEP.replace('"2d"', '"soon"'), "prep", "valid_for"),
        (GOOD_STEP.replace('"09:00"', '"25:00"'), "prep", "local_time"),
        (GOOD_STEP.replace('"home"', '"hotel"'), "prep", "unknown zone 'hotel'"),
        (GOOD_STEP.replace('"prep-guide"', '"discharge-letter"'), "prep", "discharge-letter"),
        (GOOD_STEP.replace('"prep-guide"', '"../secret"'), "prep", "not a plain template name"),
        (GOOD_STEP.replace("offset =", "ofset ="), "prep", "ofset"),
        (GOOD_STEP.replace('offset = "-14d"\n', ""), "prep", "'offset' is missing"),
        (GOOD_STEP.replace('id = "prep"', 'id = "Prep Guide!"'), "Prep Guide!", "id must be"),
    ],
)
def test_step_errors_name_file_and_step(dirs: tuple[Path, Path], body: str, step: str, words: str) -> None:
    rules, templates = dirs
    write_plan(rules, "knee-surgery.toml", body)
    with pytest.raises(RuleError) as info:
        load_care_plans(rules, templates)
    text = str(info.value)
    assert "knee-surgery.toml" in text
    assert f"step {step!r}" in text
    assert words in text


def test_step_without_id_is_named_by_position(dirs: tuple[Path, Path]) -> None:
    rules, templates = dirs
    write_plan(rules, "knee.toml", GOOD_STEP + GOOD_STEP.replace('id = "prep"\n', ""))
    with pytest.raises(RuleError, match=r"knee\.toml, step '#2': 'id' is missing"):
        load_care_plans(rules, templates)


def test_template_missing_text_part(dirs: tuple[Path, Path]) -> None:
    rules, templates = dirs
    (templates / "en" / "prep-guide.txt.j2").unlink()
    write_plan(rules, "knee.toml", GOOD_STEP)
    with pytest.raises(RuleError, match=r"en/prep-guide\.txt\.j2"):
        load_care_plans(rules, templates)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ('name = "knee"\n[[step]\n', "not valid TOML"),
        ('name = "knee"\n', "has no steps"),
        ('title = "knee"\n' + GOOD_STEP, "unknown key(s) title"),
        ('name = "Knee Plan"\n' + GOOD_STEP, "name 'Knee Plan'"),
        (GOOD_STEP, "'name' must be"),
    ],
)
def test_plan_errors_name_the_file(dirs: tuple[Path, Path], content: str, words: str) -> None:
    rules, templates = dirs
    (rules / "care-plans" / "broken.toml").write_text(content)
    with pytest.raises(RuleError) as info:
        load_care_plans(rules, templates)
    assert "broken.toml" in str(info.value)
    assert words in str(info.value)


def test_duplicate_plan_names_name_both_files(dirs: tuple[Path, Path]) -> None:
    rules, templates = dirs
    write_plan(rules, "a.toml", GOOD_STEP)
    write_plan(rules, "b.toml", GOOD_STEP)
    with pytest.raises(RuleError) as info:
        load_care_plans(rules, templates)
    assert "a.toml" in str(info.value) and "b.toml" in str(info.value)


def test_toml_time_literal_is_accepted(dirs: tuple[Path, Path]) -> None:
    rules, templates = dirs
    write_plan(rules, "knee.toml", GOOD_STEP.replace('"09:00"', "09:00:00"))
    assert str(load_care_plans(rules, templates)["knee"].steps[0].local_time) == "09:00:00"
