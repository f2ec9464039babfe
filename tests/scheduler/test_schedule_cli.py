"""End to end through the command line: a due step becomes an encrypted message, in the
patient's language, that reaches the smarthost and that the patient's own gpg decrypts.

The patient's key is generated here with the gpg command line in a throwaway GNUPGHOME; the
instance is a real ``mailhub init`` and delivery is the real serving hub.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from pathlib import Path

import pytest
from sqlmodel import Session

from mailhub.app import Hub
from mailhub.cli.main import main
from mailhub.config import load_config
from mailhub.crypto.openpgp_ops import kill_agent
from mailhub.store.models import Case, utcnow
from tests.conftest import Instance, RunningHub, SinkHandler, set_config
from tests.scheduler.sched_support import COORD, make_case

PATIENT = "lucia@patient.example"
PLAN = """
name = "e2e-plan"
[[step]]
id = "prep-guide"
template = "prep-guide"
anchor = "procedure"
offset = "-1h"
zone = "home"
valid_for = "3h"
[[step]]
id = "follow-up"
template = "follow-up-day-7"
anchor = "procedure"
offset = "+7d"
local_time = "10:00"
zone = "home"
"""


def gpg(home: Path, *args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--yes",
                           "--pinentry-mode", "loopback", "--passphrase", "", *args],
                          input=data, capture_output=True, timeout=60)


@pytest.fixture
def patient_gpg() -> Iterator[Path]:
    home = Path(tempfile.mkdtemp(prefix="mhg", dir="/tmp"))
    home.chmod(0o700)
    try:
        r = gpg(home, "--quick-gen-key", f"Lucia <{PATIENT}>", "ed25519", "sign", "1y")
        assert r.returncode == 0, r.stderr
        out = gpg(home, "--with-colons", "--list-keys", PATIENT).stdout.decode()
        fpr = [ln.split(":")[9] for ln in out.splitlines() if ln.startswith("fpr")][0]
        assert gpg(home, "--quick-add-key", fpr, "cv25519", "encr", "1y").returncode == 0
        yield home
    finally:
        kill_agent(str(home))
        shutil.rmtree(home, ignore_errors=True)


def cli(instance: Instance, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["--config", str(instance.config), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def hub(instance: Instance) -> Hub:
    (instance.root / "rules" / "care-plans" / "e2e.toml").write_text(PLAN)
    set_config(instance.config, **{"scheduler.quiet_hours": '"00:00-00:00"'})
    return Hub(load_config(instance.config))


def test_due_step_reaches_the_patient_encrypted_in_their_language(
        instance: Instance, hub: Hub, sink: tuple[SinkHandler, int], patient_gpg: Path,
        short_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    handler, _ = sink
    pub = short_tmp / "patient.asc"
    pub.write_bytes(gpg(patient_gpg, "--armor", "--export", PATIENT).stdout)
    assert cli(instance, capsys, "keys", "import", str(pub))[0] == 0
    code, hub_key, _ = cli(instance, capsys, "keys", "export-hub")
    assert code == 0 and gpg(patient_gpg, "--import", data=hub_key.encode()).returncode == 0
    with Session(hub.engine) as session:
        case = make_case(session, "MT-2027-0042", plan="e2e-plan", email=PATIENT,
                         home_tz="America/Chicago", language="es")
        case.procedure_at = utcnow() + timedelta(minutes=30)  # prep guide due 30 min ago
        session.add(case)
        session.commit()

    code, out, err = cli(instance, capsys, "schedule", "recompute", "--case", "MT-2027-0042",
                         "--json")
    assert code == 0, err
    assert json.loads(out)[0]["inserted"] == ["prep-guide", "follow-up"]
    code, out, _ = cli(instance, capsys, "schedule", "list", "--json")
    listed = {r["step"]: r for r in json.loads(out)}
    assert listed["follow-up"]["send_at_local"].endswith(("-05:00", "-06:00"))
    assert listed["follow-up"]["send_at_local"][11:16] == "10:00"
    assert datetime.fromisoformat(listed["follow-up"]["send_at_utc"]).tzinfo is not None

    code, out, err = cli(instance, capsys, "schedule", "run-due", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["sent"] == 1 and report["steps"][0]["step"] == "prep-guide"

    running = RunningHub(instance.config).start()
    try:
        received = handler.wait_for(1)
    finally:
        running.stop()
    [msg] = [m for m in received if m.rcpt_tos == [PATIENT]]
    wire = msg.content
    assert b"multipart/encrypted" in wire and "Preparación".encode() not in wire
    outer = message_from_bytes(wire)
    assert "MT-2027-0042" not in str(outer["Subject"]) and "Prep" not in str(outer["Subject"])
    assert msg.mail_from == COORD  # from the case's coordinator, as their own mail is
    armored = wire[wire.index(b"-----BEGIN PGP MESSAGE-----"):]
    armored = armored[: armored.index(b"-----END PGP MESSAGE-----") + 25]
    dec = gpg(patient_gpg, "--status-fd", "2", "--decrypt", data=armored)
    assert dec.returncode == 0, dec.stderr
    assert b"[GNUPG:] GOODSIG" in dec.stderr  # signed by the hub
    inner = message_from_bytes(dec.stdout, policy=policy.default)
    plain = dec.stdout.decode("utf-8", "replace")
    assert "Preparaci" in plain and "[MT-2027-0042]" in plain  # protected Subject, Spanish
    texts = [p.get_content() for p in inner.walk() if p.get_content_type() == "text/plain"]
    assert any("Su intervención en Anatolia" in t for t in texts)

    code, out, _ = cli(instance, capsys, "schedule", "list", "--case", "MT-2027-0042", "--json")
    status = {r["step"]: r["status"] for r in json.loads(out)}
    assert status == {"prep-guide": "sent", "follow-up": "pending"}

    with Session(hub.engine) as session:  # closing the case cancels the rest
        c = session.get(Case, "MT-2027-0042")
        c.status = "closed"
        session.add(c)
        session.commit()
    assert cli(instance, capsys, "schedule", "recompute", "--case", "MT-2027-0042")[0] == 0
    code, out, _ = cli(instance, capsys, "schedule", "list", "--json")
    assert {r["step"]: r["status"] for r in json.loads(out)} == {"prep-guide": "sent",
                                                                "follow-up": "cancelled"}
    assert cli(instance, capsys, "schedule", "run-due", "--json")[0] == 0
    assert len([m for m in handler.messages if m.rcpt_tos == [PATIENT]]) == 1


def test_templates_preview_and_clear_errors(instance: Instance, hub: Hub,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    with Session(hub.engine) as session:
        case = make_case(session, "MT-2027-0043", plan="e2e-plan", language="es",
                         home_tz="Europe/Berlin")
        case.procedure_at = datetime(2027, 3, 28, 6, 0, tzinfo=UTC)
        session.add(case)
        session.commit()
    code, out, err = cli(instance, capsys, "templates", "preview", "MT-2027-0043", "prep-guide")
    assert code == 0, err
    assert "Language: es" in out and "Preparación para su intervención" in out
    assert "Alex Example" in out and "Anatolia Orthopaedic Clinic" in out
    code, out, err = cli(instance, capsys, "templates", "preview", "MT-2027-0043", "prep-guide",
                         "--language", "de")
    assert code == 0 and "Language: de" in out and "Uhr" in out
    # a step not in the ledger yet is previewed as it would be placed
    code, out, err = cli(instance, capsys, "templates", "preview", "MT-2027-0043", "follow-up")
    assert code == 0 and "Template: follow-up-day-7" in out and "Language: es" in out, err

    code, out, err = cli(instance, capsys, "templates", "preview", "MT-2027-0043", "no-such")
    assert code == 1 and "no step 'no-such'" in err and "prep-guide" in err
    code, out, err = cli(instance, capsys, "templates", "preview", "MT-1999-0001", "prep-guide")
    assert code == 1 and "no case MT-1999-0001" in err
    code, out, err = cli(instance, capsys, "schedule", "list", "--case", "MT-1999-0001")
    assert code == 1 and "no case" in err
    with Session(hub.engine) as session:
        c = session.get(Case, "MT-2027-0043")
        c.procedure = "no-such-plan"
        session.add(c)
        session.commit()
    code, out, err = cli(instance, capsys, "schedule", "recompute", "--case", "MT-2027-0043")
    assert code == 1 and "no-such-plan" in err and "Traceback" not in err
    code, out, _ = cli(instance, capsys, "schedule", "list", "--json")
    assert json.loads(out) == []  # nothing half-scheduled


def test_new_user_flow_with_the_case_commands(instance: Instance,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """cases open/set as the brief documents them; schedule list follows every change."""
    code, out, err = cli(instance, capsys, "cases", "open", "--patient-name", "Dana Cole",
                         "--patient-email", "dana@patient.example", "--timezone",
                         "America/Chicago", "--procedure", "hip-replacement", "--clinic",
                         "Anatolia", "--coordinator", COORD)
    assert code == 0, err
    case_id = out.strip().splitlines()[-1]
    code, out, err = cli(instance, capsys, "cases", "set", case_id,
                         "procedure_at=2027-03-20T08:00", "procedure_tz=Europe/Istanbul",
                         "arrival_at=2027-03-17T22:30", "discharge_at=2027-03-24T11:00",
                         "return_home_at=2027-03-27T14:00")
    assert code == 0, err

    def local_times() -> dict[str, tuple[str, str]]:
        code, out, _ = cli(instance, capsys, "schedule", "list", "--case", case_id, "--json")
        assert code == 0
        return {r["step"]: (r["send_at_local"], r["status"]) for r in json.loads(out)}

    got = local_times()
    assert got["prep-guide"] == ("2027-03-06T09:00:00-06:00", "pending")  # CST
    assert got["follow-up-day-7"] == ("2027-04-03T10:00:00-05:00", "pending")  # CDT
    assert got["fasting-instructions"] == ("2027-03-19T18:00:00+03:00", "pending")
    assert len(got) == 8
    assert cli(instance, capsys, "cases", "set", case_id, "procedure_at=2027-04-10T08:00")[0] == 0
    got = local_times()
    assert got["prep-guide"] == ("2027-03-27T09:00:00-05:00", "pending")  # now after the change
    assert got["fasting-instructions"] == ("2027-04-09T18:00:00+03:00", "pending")
    assert cli(instance, capsys, "cases", "set", case_id, "status=closed")[0] == 0
    assert {status for _, status in local_times().values()} == {"cancelled"}


def test_recompute_of_every_case_reports_a_broken_one_and_does_the_rest(
        instance: Instance, hub: Hub, capsys: pytest.CaptureFixture[str]) -> None:
    """One open case naming a care plan that does not exist must not keep every other case
    from being recomputed (the command the README says to run after editing a plan)."""
    with Session(hub.engine) as session:
        for case_id, plan in (("MT-2027-0051", "e2e-plan"), ("MT-2027-0052", "no-such-plan"),
                              ("MT-2027-0053", "e2e-plan")):
            case = make_case(session, case_id, plan=plan, home_tz="Europe/Berlin")
            case.procedure_at = datetime(2027, 3, 28, 6, 0, tzinfo=UTC)
            session.add(case)
        session.commit()
    code, out, err = cli(instance, capsys, "schedule", "recompute", "--json")
    assert code == 1 and "Traceback" not in err
    by_case = {r["case"]: r for r in json.loads(out)}
    assert set(by_case) == {"MT-2027-0051", "MT-2027-0052", "MT-2027-0053"}
    assert "no-such-plan" in by_case["MT-2027-0052"]["error"]
    assert by_case["MT-2027-0052"]["hint"]
    for ok in ("MT-2027-0051", "MT-2027-0053"):
        assert by_case[ok]["plan"] == "e2e-plan" and by_case[ok]["inserted"]
    code, out, _ = cli(instance, capsys, "schedule", "list", "--json")
    assert {r["case"] for r in json.loads(out)} == {"MT-2027-0051", "MT-2027-0053"}
    code, out, _ = cli(instance, capsys, "schedule", "recompute")
    assert code == 1 and "MT-2027-0052: not recomputed:" in out and "MT-2027-0051: 0 new" in out
