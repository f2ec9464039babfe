"""The dispatcher on SQLite: downtime catch-up, no second send after a reschedule, crash
recovery from every point between claim and record, templates that fail, and the real
apscheduler-driven service loop."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import Session

from mailhub.crypto.engine import CryptoEngine
from mailhub.outbound.pipeline import OutboundPipeline
from mailhub.scheduler.dispatcher import Dispatcher
from mailhub.scheduler.ledger import claim_due, reschedule_case
from mailhub.scheduler.sender import StepSender
from mailhub.store.models import Case, OutboundItem, Payload, utcnow
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
    assert list((hub.spool.root / "scheduler").glob("*.msg")) == []
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


def test_crash_between_spool_and_record_sends_once(hub) -> None:  # type: ignore[no-untyped-def]
    now = wall("2027-03-06T09:00:01", CHI)
    [claim] = claim_due(hub.engine, now, "crashed")
    sender = StepSender(hub, OutboundPipeline(hub, CryptoEngine(0)).process)
    sid = sender.spool(claim, sender.build(claim), now)  # ... and then the process died
    assert sid == f"sched-{claim.id}" and (hub.spool.root / "scheduler" / f"{sid}.msg").exists()
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
    assert list((hub.spool.root / "scheduler").glob("*.msg")) == []


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

    async def scenario() -> dict[str, str]:
        stop = asyncio.Event()
        dispatcher = Dispatcher(hub, "svc", poll_interval=0.2)
        task = asyncio.create_task(dispatcher.run(stop))
        for _ in range(300):
            await asyncio.sleep(0.1)
            if rows(hub)["soon"].status != "pending":
                break
        stop.set()
        await asyncio.wait_for(task, 30)
        return {s: r.status for s, r in rows(hub).items()}

    statuses = asyncio.run(scenario())
    assert statuses == {"late": "missed", "recent": "held", "soon": "held", "later": "pending"}
    soon = rows(hub)["soon"]
    assert soon.sent_at is not None and soon.sent_at >= soon.send_at_utc  # never early
    for step in ("recent", "soon"):
        assert len(mail_rows(hub, f"sched-{rows(hub)[step].id}")) == 1
