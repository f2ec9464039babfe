"""``mailhub cases ...`` as a user runs it: output shapes, errors, export files."""

from __future__ import annotations

import json
import mailbox
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlmodel import Session

from mailhub.app import Hub
from mailhub.cases.filing import file_inbound
from mailhub.cli.main import main
from mailhub.config import load_config
from mailhub.crypto.protection import Protection
from tests.cases.case_support import (
    CLINIC,
    PATIENT,
    _pg_database,
    _sqlite_template,
    mail,
    make_instance_dir,
    shared_parts,
)

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture(params=["sqlite", "postgresql"])
def instance(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A working instance (config.toml path) on SQLite or PostgreSQL."""
    root = Path(tempfile.mkdtemp(prefix="mhcli", dir="/tmp"))
    url = _pg_database(request.config) if request.param == "postgresql" else ""
    cfg = make_instance_dir(root, url, shared=shared_parts(request.config))
    if not url:
        (root / "var").mkdir()
        shutil.copyfile(_sqlite_template(request.config), root / "var" / "mailhub.db")
    yield cfg
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def run(instance: Path, capsys: pytest.CaptureFixture[str]) -> Run:
    def _run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(["--config", str(instance), *args])
        out, err = capsys.readouterr()
        return code, out, err

    return _run


def _open(run: Run, email: str = PATIENT, *extra: str) -> str:
    code, out, err = run("cases", "open", "--patient-name", "Ana Silva", "--patient-email", email,
                         "--timezone", "America/Chicago", "--language", "es",
                         "--procedure", "hip-replacement", "--clinic", "Clinic A", *extra)
    assert code == 0, err
    return out.strip()


def _file(instance: Path, raw: bytes, protection: Protection | None = None) -> str:
    hub = Hub(load_config(instance))
    try:
        with Session(hub.engine) as s:
            result = file_inbound(s, hub, raw, protection)
            s.commit()
        return result.case_id
    finally:
        hub.engine.dispose()


def test_open_prints_the_id_alone(run: Run) -> None:
    code, out, err = run("cases", "open", "--patient-name", "Ana Silva", "--patient-email",
                         PATIENT, "--timezone", "Europe/Lisbon", "--language", "pt",
                         "--procedure", "hip-replacement", "--clinic", "Clinic A")
    assert code == 0 and re.fullmatch(r"MT-\d{4}-0001\n", out), (out, err)
    code, out, _ = run("cases", "open", "--patient-name", "Bo", "--patient-email",
                       "bo@patient.example", "--timezone", "Asia/Seoul", "--language", "ko",
                       "--procedure", "rhinoplasty", "--clinic", "Seoul Care", "--json")
    assert code == 0 and list(json.loads(out)) == ["id"]
    assert json.loads(out)["id"].endswith("-0002")


def test_a_language_no_template_speaks_is_a_note_naming_the_fallback(run: Run) -> None:
    """Opening or changing a case to a language without templates works, and says the patient's
    scheduled messages will be in English; a language with templates, or its region, says
    nothing."""
    code, out, err = run("cases", "open", "--patient-name", "K", "--patient-email",
                         "k@patient.example", "--timezone", "Asia/Seoul", "--language", "ko",
                         "--procedure", "hip-replacement", "--clinic", "X")
    assert code == 0 and "no templates in language 'ko'" in err and "'en'" in err
    assert "es" in err.split("there are:")[1]  # names the languages there are
    case_id = out.strip()
    for lang in ("de", "es-MX"):
        code, _, err = run("cases", "set", case_id, f"language={lang}")
        assert code == 0 and "no templates" not in err, err
    code, _, err = run("cases", "set", case_id, "language=xx")
    assert code == 0 and "no templates in language 'xx'" in err


def test_unknown_care_plan_is_a_note_not_an_error(run: Run) -> None:
    code, out, err = run("cases", "open", "--patient-name", "C", "--patient-email",
                         "c@patient.example", "--timezone", "UTC", "--language", "en",
                         "--procedure", "no-such-plan", "--clinic", "X")
    assert code == 0 and re.fullmatch(r"MT-\d{4}-\d{4}\n", out)
    assert "no care plan named 'no-such-plan'" in err


def test_list_and_show_json(run: Run, instance: Path) -> None:
    cid = _open(run)
    assert _file(instance, mail(msgid="<p1@patient.example>", subject="Re: Hello [x]"),
                 Protection("none", "none")) == cid
    assert _file(instance, mail(msgid="<c1@clinic-a.example>", frm=CLINIC, name="Dr K",
                                subject=f"AW: [{cid}] Befund", irt=["<p1@patient.example>"]),
                 Protection("openpgp", "verified", "B" * 40)) == cid
    code, out, _ = run("cases", "list", "--json")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 1
    assert {k: rows[0][k] for k in ("id", "patient_email", "status", "message_count")} == {
        "id": cid, "patient_email": PATIENT, "status": "inquiry", "message_count": 2}
    code, out, _ = run("cases", "list", "--json", "--status", "closed")
    assert json.loads(out) == []
    code, out, _ = run("cases", "show", cid, "--json")
    view = json.loads(out)
    assert code == 0
    assert (view["id"], view["patient_email"], view["status"]) == (cid, PATIENT, "inquiry")
    assert view["schedule"] == [] or all(
        set(r) >= {"case", "step", "template", "send_at_utc", "send_at_local", "timezone",
                   "status"} for r in view["schedule"])
    first, second = view["messages"]
    assert {k: first[k] for k in ("message_id", "direction", "from", "to", "subject",
                                  "encryption", "signature")} == {
        "message_id": "<p1@patient.example>", "direction": "in", "from": PATIENT,
        "to": ["intake@medvoyage.example"], "subject": "Hello [x]", "encryption": "none",
        "signature": "none"}
    assert (second["subject"], second["encryption"], second["signature"]) == (
        f"[{cid}] Befund", "openpgp", "verified")
    code, out, _ = run("cases", "show", cid)
    assert code == 0 and "Befund" in out and "openpgp/verified" in out
    code, out, _ = run("cases", "list")
    assert code == 0 and cid in out


def test_set_and_its_errors(run: Run) -> None:
    cid = _open(run)
    code, out, err = run("cases", "set", cid, "procedure_at=2026-12-03T08:00",
                         "procedure_tz=Europe/Istanbul", "status=pre-op", "--json")
    assert code == 0, err
    assert json.loads(out)["changed"]["procedure_at"] == "2026-12-03T05:00:00+00:00"
    for pairs, expected in [(["procedure_tz=Europe/Atlantis"], "Europe/Atlantis"),
                            (["procedure_at=2026-02-30T08:00"], "procedure_at"),
                            (["favourite=blue"], "unknown key"),
                            (["status=closed", "arrival_at=soon"], "arrival_at")]:
        code, out, err = run("cases", "set", cid, *pairs)
        assert code == 1 and out == "" and err.startswith("mailhub: error:"), (pairs, err)
        assert expected in err and "Traceback" not in err
    code, out, _ = run("cases", "show", cid, "--json")
    view = json.loads(out)
    assert view["status"] == "pre-op"  # the refused "status=closed" was not applied
    assert view["events"]["procedure"]["timezone"] == "Europe/Istanbul"
    code, _, err = run("cases", "set", "MT-2020-0999", "status=closed")
    assert code == 1 and "no case" in err


def test_bad_open_creates_nothing(run: Run) -> None:
    code, out, err = run("cases", "open", "--patient-name", "X", "--patient-email", "x@y.example",
                         "--timezone", "Nowhere/Special", "--language", "en", "--procedure",
                         "p", "--clinic", "c")
    assert code == 1 and "Nowhere/Special" in err and "Traceback" not in err
    assert json.loads(run("cases", "list", "--json")[1]) == []
    code, _, err = run("cases", "show", "MT-2026-4242")
    assert code == 1 and "no case" in err


def test_merge(run: Run, instance: Path) -> None:
    target = _open(run)
    source = _file(instance, mail(msgid="<x1@second.example>", frm="ana@second.example"))
    code, out, err = run("cases", "merge", source, target, "--json")
    assert code == 0, err
    assert json.loads(out)["messages_moved"] == 1
    rows = {r["id"]: r for r in json.loads(run("cases", "list", "--json")[1])}
    assert rows[source]["status"] == "closed" and rows[source]["merged_into"] == target
    assert rows[target]["message_count"] == 1
    code, _, err = run("cases", "merge", source, target)
    assert code == 1 and "already merged" in err


def test_export_mbox_and_zip(run: Run, instance: Path, tmp_path: Path) -> None:
    cid = _open(run)
    _file(instance, mail(msgid="<e1@patient.example>", subject="Scans", body="From here on\nok"))
    _file(instance, mail(msgid="<e2@clinic-a.example>", frm=CLINIC, subject=f"[{cid}] Re: Scans",
                         body="Looks good"))
    out_file = tmp_path / "case.mbox"
    code, out, err = run("cases", "export", cid, "--output", str(out_file))
    assert code == 0 and "plaintext" in err.lower() and "warning" in err
    assert os.stat(out_file).st_mode & 0o777 == 0o600
    box = mailbox.mbox(str(out_file))
    msgs = list(box)
    assert [m["Message-ID"] for m in msgs] == ["<e1@patient.example>", "<e2@clinic-a.example>"]
    box.close()
    lines = out_file.read_bytes().split(b"\n")
    assert b">From here on" in lines  # mboxrd quoting: a body line is not a separator
    assert sum(1 for line in lines if line.startswith(b"From ")) == 2
    code, _, err = run("cases", "export", cid, "--output", str(out_file))
    assert code == 1 and "already exists" in err  # never overwrites
    zpath = tmp_path / "case.zip"
    code, out, err = run("cases", "export", cid, "--output", str(zpath), "--format", "zip",
                         "--json")
    assert code == 0 and json.loads(out)["messages"] == 2 and "plaintext" in err.lower()
    assert os.stat(zpath).st_mode & 0o777 == 0o600
    with zipfile.ZipFile(zpath) as zf:
        names = zf.namelist()
        assert names == ["messages/00001-in.eml", "messages/00002-in.eml", "case.json"]
        assert b"Looks good" in zf.read("messages/00002-in.eml")
        assert json.loads(zf.read("case.json"))["id"] == cid
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("instance", ["sqlite"], indirect=True)
def test_the_installed_entry_point(instance: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "mailhub", "--config", str(instance), "cases",
                           "open", "--patient-name", "Dana", "--patient-email",
                           "dana@patient.example", "--timezone", "Europe/Berlin",
                           "--language", "de", "--procedure", "dental-implants",
                           "--clinic", "Clinic A"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"MT-\d{4}-\d{4}\n", proc.stdout)
