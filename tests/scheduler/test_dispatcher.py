"""The dispatcher on SQLite: downtime catch-up, no second send after a reschedule, crash
recovery from every point between claim and record, templates that fail, and the real
apscheduler-driven service loop."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from email import message_from_string, policy
from pathlib import Path

import pytest
from sqlmodel import Session

from mailhub.crypto.engine import CryptoEngine
from mailhub.outbound.pipeline import OutboundPipeline
from mailhub.scheduler.dispatcher import Dispatcher
from mailhub.scheduler.ledger import claim_due, reschedule_case
from mailhub.scheduler.sender import StepSender
from mailhub.store.models import Case, OutboundItem, Patient, Payload, utcnow
from tests.scheduler.sched_support import (
    COORD,
    REPO,
    custom_rules,
    light_hub,
    make_case,
    outbound,
    rows,
    set_events,
    wall,
)
from tests.scheduler.test_ledger import CHI, EVENTS, IST

BEFORE = datetime(2027, 1, 10, tzinfo=UTC)
PATIENT = "alex@patient.example"


@pytest.fixture
def hub(short_tmp: Path):  # type: ignore[no-untyped-def]
    h = light_hub(short_tmp / "hub")
    with Session(h.engine) as session:
        make_case(session, events=EVENTS)
        reschedule_case(session, h, "MT-2027-0001", now=BEFORE)
        session.commit()
    return h


def payload_text(hub, item: OutboundItem) -> str:  # type: ignore[no-untyped-def]
    with Session(hub.engine) as session:
        sealed = session.get(Payload, item.payload_id).sealed
    return hub.sealer.open(sealed, str(item.payload_id).encode()).decode("utf-8", "replace")


def mail_rows(hub, source_id: str) -> list[OutboundItem]:  # type: ignore[no-untyped-def]
    return [r for r in outbound(hub) if r.source_id == source_id and r.kind == "mail"]


def test_restart_after_downtime_sends_within_window_and_misses_the_rest(hub) -> None:  # type: ignore[no-untyped-def]
    # the hub was down from before the prep guide until after the arrival welcome was due
    now = wall("2027-03-18T09:00", IST)
    report = Dispatcher(hub, "A").run_due(now)
    got = rows(hub)
    assert got["prep-guide"].status == "missed" and got["travel-checklist"].status == "missed"
    assert "window closed" in got["prep-guide"].reason
    # within its 12h window: handed to the outbound path; the patient has no key: held
    welcome = got["arrival-welcome"]
    assert welcome.status == "held" and PATIENT in welcome.reason
    assert welcome.queue_source_id == f"sched-{welcome.id}" and welcome.template_version
    assert got["fasting-instructions"].status == "pending"  # not due yet
    assert (report.missed, report.held, report.claimed) == (2, 1, 3)

    patient_rows = mail_rows(hub, welcome.queue_source_id)
    assert [(r.recipient, r.status) for r in patient_rows] == [(PATIENT, "held")]
    notices = [r for r in outbound(hub) if r.kind == "notice"]
    missed = [n for n in notices if n.source_id.endswith(":missed")]
    assert sorted(n.source_id for n in missed) == sorted(
        f"sched-{got[s].id}:missed" for s in ("prep-guide", "travel-checklist"))
    assert all(n.recipient == COORD for n in notices)
    text = payload_text(hub, missed[0])
    assert "MT-2027-0001" in text and ("prep-guide" in text or "travel-checklist" in text)
    assert "Alex" not in text and PATIENT not in text and "Anatolia" not in text
    # the held copy produced the outbound path's own notice to the coordinator
    assert any(n.source_id == f"{welcome.queue_source_id}:held:{PATIENT}" for n in notices)
    assert hub.spool.pending("scheduler") == []
    # a second pass finds nothing more to do
    assert Dispatcher(hub, "B").run_due(now).claimed == 0


def test_a_sent_step_is_never_sent_again_after_a_reschedule(hub) -> None:  # type: ignore[no-untyped-def]
    Dispatcher(hub, "A").run_due(wall("2027-03-06T09:00:01", CHI))
    prep = rows(hub)["prep-guide"]
    assert prep.queue_source_id and prep.status == "held"
    with Session(hub.engine) as session:  # the whole trip moves three weeks later
        case = session.get(Case, "MT-2027-0001")
        set_events(case, {"arrival": ("2027-04-07T22:30", IST),
                          "procedure": ("2027-04-10T08:00", IST),
                          "discharge": ("2027-04-14T11:00", IST),
                          "return_home": ("2027-04-17T14:00", CHI)})
        session.add(case)
        result = reschedule_case(session, hub, "MT-2027-0001", now=BEFORE)
        session.commit()
    assert "prep-guide" not in result.updated and "travel-checklist" in result.updated
    report = Dispatcher(hub, "A").run_due(wall("2027-03-27T09:00:01", CHI))  # new prep date
    assert [o.step for o in report.outcomes] == []
    assert len(mail_rows(hub, prep.queue_source_id)) == 1
    assert rows(hub)["prep-guide"].send_at_utc == wall("2027-03-06T09:00", CHI)


def test_a_patient_name_that_decodes_to_a_line_break_is_sent_safely(hub) -> None:  # type: ignore[no-untyped-def]
    # a first contact's From can carry a double-encoded name: the case keeps the inner encoded
    # word as text, and the step's To (and a Subject naming the patient) must not decode it
    # into a header line; it used to raise ValueError on every claim, the step never held
    with Session(hub.engine) as session:
        patient = session.get(Patient, session.get(Case, "MT-2027-0001").patient_id)
        patient.name = "=?utf-8?q?Alex=0D=0ABcc:_evil@example.net?="
        session.add(patient)
        session.commit()
    report = Dispatcher(hub, "A").run_due(wall("2027-03-06T09:00:01", CHI))
    prep = rows(hub)["prep-guide"]
    assert report.errors == 0 and prep.status == "held" and prep.queue_source_id
    [item] = mail_rows(hub, prep.queue_source_id)
    sent = message_from_string(payload_text(hub, item), policy=policy.default)
    assert sent["Bcc"] is None and [a.addr_spec for a in sent["To"].addresses] == [PATIENT]


def test_crash_between_spool_and_record_sends_once(hub) -> None:  # type: ignore[no-untyped-def]
    now = wall("2027-03-06T09:00:01", CHI)
    [claim] = claim_due(hub.engine, now, "crashed")
    sender = StepSender(hub, OutboundPipeline(hub, CryptoEngine(0)).process)
    sid = sender.spool(claim, sender.build(claim), now)  # ... and then the process died
    assert sid == f"sched-{claim.id}" and hub.spool.contains("scheduler", sid)
    assert rows(hub)["prep-guide"].status == "pending"
    # another instance: the claim is not stale yet, so it leaves the row alone
    assert Dispatcher(hub, "B").run_due(now).claimed == 0
    # once stale, it finishes the job from the spool file left behind
    report = Dispatcher(hub, "B", stale_after=timedelta(0)).run_due(now)
    assert [(o.step, o.status) for o in report.outcomes] == [("prep-guide", "held")]
    assert len(mail_rows(hub, sid)) == 1

    # crash after the outbound path queued it but before the ledger was updated
    now = wall("2027-03-13T09:00:01", CHI)
    [claim] = claim_due(hub.engine, now, "crashed")
    sid = sender.spool(claim, sender.build(claim), now)
    asyncio.run(sender.process("scheduler", sid))
    assert rows(hub)["travel-checklist"].status == "pending"
    report = Dispatcher(hub, "C", stale_after=timedelta(0)).run_due(now)
    assert [(o.step, o.status) for o in report.outcomes] == [("travel-checklist", "held")]
    assert len(mail_rows(hub, sid)) == 1
    assert hub.spool.pending("scheduler") == []


def test_a_template_that_fails_to_render_holds_the_step_with_the_reason(short_tmp: Path) -> None:
    import shutil

    templates = short_tmp / "templates"
    shutil.copytree(REPO / "templates", templates)
    (templates / "en" / "broken.subject.j2").write_text("Your {{ visit_kind }}\n")
    (templates / "en" / "broken.txt.j2").write_text("Hello\n")
    rules = custom_rules(short_tmp, """
name = "test-plan"
[[step]]
id = "bad-step"
template = "broken"
anchor = "procedure"
offset = "-1d"
local_time = "09:00"
[[step]]
id = "good-step"
template = "prep-guide"
anchor = "procedure"
offset = "-1d"
local_time = "10:00"
""")
    hub = light_hub(short_tmp / "hub", rules_dir=rules, templates_dir=templates)
    with Session(hub.engine) as session:
        make_case(session, plan="test-plan", events=EVENTS)
        reschedule_case(session, hub, "MT-2027-0001", now=BEFORE)
        session.commit()
    report = Dispatcher(hub, "A").run_due(wall("2027-03-19T12:00", CHI))
    got = rows(hub)
    assert got["bad-step"].status == "held"
    assert "visit_kind" in got["bad-step"].reason and "broken" in got["bad-step"].reason
    assert got["bad-step"].queue_source_id == ""  # nothing half-sent
    assert mail_rows(hub, f"sched-{got['bad-step'].id}") == []
    assert got["good-step"].status == "held" and got["good-step"].queue_source_id  # unaffected
    notices = [r for r in outbound(hub) if r.source_id == f"sched-{got['bad-step'].id}:held"]
    assert len(notices) == 1 and notices[0].recipient == COORD
    assert report.held == 2
    # a later change of the case retries it (the template was fixed meanwhile)
    (templates / "en" / "broken.subject.j2").write_text("Your visit\n")
    with Session(hub.engine) as session:
        reschedule_case(session, hub, "MT-2027-0001", now=BEFORE)
        session.commit()
    assert rows(hub)["bad-step"].status == "pending"


def test_service_loop_catches_up_at_start_and_wakes_for_the_next_step(short_tmp: Path) -> None:
    rules = custom_rules(short_tmp, """
name = "test-plan"
[[step]]
id = "late"
template = "prep-guide"
anchor = "procedure"
offset = "-3h"
valid_for = "1h"
[[step]]
id = "recent"
template = "travel-checklist"
anchor = "procedure"
offset = "-1h"
valid_for = "2h"
[[step]]
id = "soon"
template = "fasting-instructions"
anchor = "procedure"
offset = "0"
valid_for = "1h"
[[step]]
id = "stalled"
template = "wound-care"
anchor = "procedure"
offset = "+2s"
valid_for = "1h"
[[step]]
id = "later"
template = "follow-up-day-7"
anchor = "procedure"
offset = "+1h"
""")
    hub = light_hub(short_tmp / "hub", rules_dir=rules, quiet_hours="00:00-00:00")
    with Session(hub.engine) as session:
        case = make_case(session, plan="test-plan")
        case.procedure_at = utcnow().replace(microsecond=0) + timedelta(seconds=3)
        session.add(case)
        reschedule_case(session, hub, case.id)
        session.commit()

    async def until_handled(step: str) -> None:
        for _ in range(300):
            await asyncio.sleep(0.1)
            if rows(hub)[step].status != "pending":
                return

    async def scenario() -> tuple[dict[str, str], object]:
        stop = asyncio.Event()
        dispatcher = Dispatcher(hub, "svc", poll_interval=0.2)
        task = asyncio.create_task(dispatcher.run(stop))
        await dispatcher.ready.wait()
        job = dispatcher.armed_job()
        await until_handled("soon")
        # the event loop stalls past "stalled"'s due time (apscheduler's default grace is 1 s)
        time.sleep(max(0.0, (rows(hub)["stalled"].send_at_utc - utcnow()).total_seconds()) + 2.5)
        await until_handled("stalled")
        stop.set()
        await asyncio.wait_for(task, 30)
        return {s: r.status for s, r in rows(hub).items()}, job

    statuses, job = asyncio.run(scenario())
    assert statuses == {"late": "missed", "recent": "held", "soon": "held", "stalled": "held",
                        "later": "pending"}
    assert job.misfire_grace_time is None and job.coalesce is True  # type: ignore[attr-defined]
    for step in ("soon", "stalled"):
        row = rows(hub)[step]
        assert row.sent_at is not None and row.sent_at >= row.send_at_utc  # never early
    for step in ("recent", "soon", "stalled"):
        assert len(mail_rows(hub, f"sched-{rows(hub)[step].id}")) == 1


def test_claims_of_dead_local_processes_are_released_at_start(hub) -> None:  # type: ignore[no-untyped-def]
    import os

    from mailhub.instance import pid_alive
    from mailhub.scheduler.dispatcher import release_dead_claims

    now = wall("2027-03-13T09:00:01", CHI)
    dead = subprocess_pid()
    claim_due(hub.engine, now, f"box:{dead}:aa", limit=1)  # prep-guide (its window closed)
    claim_due(hub.engine, now, f"box:{os.getpid()}:bb", limit=1)  # travel-checklist
    assert release_dead_claims(hub.engine, "other-box", pid_alive) == 0
    assert release_dead_claims(hub.engine, "box", pid_alive) == 1
    got = rows(hub)
    assert got["prep-guide"].claimed_by == "" and got["prep-guide"].claimed_at is None
    assert got["travel-checklist"].claimed_by.startswith("box:")


def subprocess_pid() -> int:
    """The pid of a process that has certainly exited."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_a_held_step_released_from_the_queue_counts_as_sent(hub) -> None:  # type: ignore[no-untyped-def]
    from mailhub.scheduler.dispatcher import sync_released

    Dispatcher(hub, "A").run_due(wall("2027-03-06T09:00:01", CHI))
    prep = rows(hub)["prep-guide"]
    assert prep.status == "held"
    assert sync_released(hub.engine) == 0  # still held in the queue
    with Session(hub.engine) as session:  # what 'mailhub queue release' does once a key exists
        [item] = [session.get(OutboundItem, r.id) for r in mail_rows(hub, prep.queue_source_id)]
        item.status = "queued"
        session.add(item)
        session.commit()
    assert sync_released(hub.engine) == 1
    assert rows(hub)["prep-guide"].status == "sent"
