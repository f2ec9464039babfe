"""Case operations on SQLite and PostgreSQL: open, set (events and zones), merge, list, show."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from mailhub.app import Hub
from mailhub.cases.export import list_cases, show_case
from mailhub.cases.filing import file_inbound
from mailhub.cases.service import (
    CaseInputError,
    merge_cases,
    merged_targets,
    open_case,
    set_fields,
)
from mailhub.cases.store import (
    file_message,
    identify,
    message_aad,
    parse_message,
    subject_aad,
)
from mailhub.errors import NotFound
from mailhub.store import audit
from mailhub.store.models import Case, Participant, Patient, ScheduleEntry, StoredMessage
from tests.cases.case_support import (  # noqa: F401
    CLINIC,
    COORD,
    PATIENT,
    hub_fixture,
    mail,
    session,
)

ACTOR = "cli:tester"


def _open(hub: Hub, email: str = PATIENT, tz: str = "America/Chicago", **kw: str) -> str:
    args = {"patient_name": "Ana Silva", "patient_email": email, "timezone": tz,
            "language": "es", "procedure": "hip-replacement", "clinic": "Clinic A",
            "coordinator": COORD, **kw}
    with session(hub) as s:
        cid = open_case(s, actor=ACTOR, **args).id  # type: ignore[arg-type]
        s.commit()
    return cid


def _set(hub: Hub, cid: str, *pairs: str):  # type: ignore[no-untyped-def]
    with session(hub) as s:
        result = set_fields(s, hub, cid, list(pairs), actor=ACTOR)
        s.commit()
    return result


def _case(hub: Hub, cid: str) -> Case:
    with session(hub) as s:
        case = s.get(Case, cid)
        assert case is not None
        return case


def _audit_count(hub: Hub) -> int:
    with session(hub) as s:
        return len(list(audit.iter_entries(s)))


def test_open_validates_everything_and_creates_nothing_on_error(hub: Hub) -> None:
    with session(hub) as s, pytest.raises(CaseInputError) as err:
        open_case(s, patient_name="", patient_email="not-an-address", timezone="Mars/Olympus",
                  language="english!", procedure="x", clinic="y", actor=ACTOR)
    text = str(err.value)
    for part in ("patient name is empty", "not-an-address", "Mars/Olympus", "english!"):
        assert part in text
    with session(hub) as s:
        assert s.execute(select(Case)).first() is None
        assert s.execute(select(Patient)).first() is None
    cid = _open(hub, email="Ana.Silva@PATIENT.example")
    with session(hub) as s:
        patient = s.execute(select(Patient)).scalar_one()
        assert (patient.email, patient.timezone, patient.language) == (
            "Ana.Silva@patient.example", "America/Chicago", "es")
        assert s.get(Case, cid).status == "inquiry"  # type: ignore[union-attr]


def test_events_default_zones_and_dst(hub: Hub) -> None:
    cid = _open(hub)
    r = _set(hub, cid, "procedure_at=2026-12-03T08:00", "procedure_tz=Europe/Istanbul",
             "arrival_at=2026-11-30T14:30:15", "discharge_at=2026-12-08T10:00",
             "return_home_at=2027-03-14T02:30")
    assert r.schedule_error is None
    case = _case(hub, cid)
    assert case.procedure_at == datetime(2026, 12, 3, 5, 0, tzinfo=UTC)  # Istanbul is UTC+3
    assert (case.arrival_tz, case.discharge_tz) == ("Europe/Istanbul", "Europe/Istanbul")
    assert case.arrival_at == datetime(2026, 11, 30, 11, 30, 15, tzinfo=UTC)
    assert case.procedure_local == "2026-12-03T08:00:00"
    # return home in the patient's home zone; 02:30 does not exist that night: 03:00 CDT
    assert case.return_home_tz == "America/Chicago"
    assert case.return_home_at == datetime(2027, 3, 14, 8, 0, tzinfo=UTC)
    # changing only the zone re-reads the same wall-clock time there
    _set(hub, cid, "procedure_tz=Asia/Seoul")
    assert _case(hub, cid).procedure_at == datetime(2026, 12, 2, 23, 0, tzinfo=UTC)
    # an explicit offset pins the instant
    _set(hub, cid, "discharge_at=2026-12-08T10:00+01:00")
    case = _case(hub, cid)
    assert case.discharge_at == datetime(2026, 12, 8, 9, 0, tzinfo=UTC)
    assert case.discharge_local == "2026-12-08T12:00:00"
    # clearing an event
    _set(hub, cid, "arrival_at=")
    assert _case(hub, cid).arrival_at is None


def test_event_without_any_zone_uses_home_and_says_so(hub: Hub) -> None:
    cid = _open(hub)
    r = _set(hub, cid, "procedure_at=2026-07-01T09:00")
    assert any("America/Chicago" in n for n in r.notes)
    assert _case(hub, cid).procedure_at == datetime(2026, 7, 1, 14, 0, tzinfo=UTC)


def test_set_is_all_or_nothing(hub: Hub) -> None:
    cid = _open(hub)
    before = _audit_count(hub)
    bad = [
        (["status=recovery", "procedure_tz=Europe/Nowhere"], "Europe/Nowhere"),
        (["status=recovery", "procedure_at=2026-13-45T08:00"], "procedure_at"),
        (["status=recovery", "procedure_at=tomorrow"], "2026-12-03T08:00"),
        (["status=recovery", "colour=blue"], "unknown key 'colour'"),
        (["status=sleeping"], "sleeping"),
        (["status=recovery", "status=closed"], "twice"),
        (["consent_plain_email=maybe"], "yes or no"),
        (["clinic=" + "x" * 500], "longer than"),
        (["status"], "KEY=VALUE"),
    ]
    for pairs, expected in bad:
        with session(hub) as s, pytest.raises(CaseInputError) as err:
            set_fields(s, hub, cid, pairs, actor=ACTOR)
        assert expected in str(err.value), pairs
    case = _case(hub, cid)
    assert (case.status, case.procedure_tz, case.procedure_at) == ("inquiry", "", None)
    assert _audit_count(hub) == before
    with session(hub) as s, pytest.raises(NotFound):
        set_fields(s, hub, "MT-1999-0042", ["status=closed"], actor=ACTOR)


def test_status_consent_and_fields_are_audited(hub: Hub) -> None:
    cid = _open(hub)
    r = _set(hub, cid, "status=pre-op", "consent_plain_email=yes", "clinic=Clinic B",
             "language=de", "timezone=Europe/Berlin", "coordinator=max@medvoyage.example")
    assert r.changed["status"] == "pre-op" and r.changed["consent_plain_email"] is True
    case = _case(hub, cid)
    assert (case.status, case.clinic, case.consent_plain_email) == ("pre-op", "Clinic B", True)
    assert case.consent_by == ACTOR and case.consent_at is not None
    with session(hub) as s:
        patient = s.get(Patient, case.patient_id)
        assert (patient.language, patient.timezone) == ("de", "Europe/Berlin")  # type: ignore[union-attr]
        entries = list(audit.iter_entries(s, case_id=cid))
        assert [e.action for e in entries] == ["case-opened", "consent-changed", "case-updated"]
        assert entries[1].actor == ACTOR
        assert json.loads(entries[1].detail) == {"consent_plain_email": True, "by": ACTOR}
        assert json.loads(entries[2].detail)["fields"]["status"] == "pre-op"
        parts = set(s.execute(select(Participant.address)
                              .where(Participant.case_id == cid)).scalars())
        assert "max@medvoyage.example" in parts
    assert _set(hub, cid, "status=pre-op").changed == {}  # nothing new: nothing written


def test_merge_moves_messages_and_participants(hub: Hub) -> None:
    target = _open(hub)
    with session(hub) as s:
        first = file_inbound(s, hub, mail(msgid="<m1@second.example>", frm="ana@second.example",
                                          subject="hi from my other address"))
        s.commit()
    source = first.case_id
    assert first.created_case and source != target
    with session(hub) as s:
        result = merge_cases(s, hub, source, target, actor=ACTOR)
        s.commit()
    assert result["messages_moved"] == 1
    src = _case(hub, source)
    assert (src.status, src.merged_into) == ("closed", target)
    with session(hub) as s:
        assert s.get(StoredMessage, first.message_pk).case_id == target  # type: ignore[union-attr]
        parts = dict(s.execute(select(Participant.address, Participant.case_id)).all())
        assert parts["ana@second.example"] == target
        assert source not in parts.values()
        actions = [e.action for e in audit.iter_entries(s, case_id=source)]
        assert actions[-1] == "case-merged"
        # a reply to the moved message, and mail tagged with the old id, land in the target
        reply = file_inbound(s, hub, mail(msgid="<m2@clinic-a.example>", frm=CLINIC,
                                          irt=["<m1@second.example>"]))
        tagged = file_inbound(s, hub, mail(msgid="<m3@clinic-a.example>", frm=CLINIC,
                                           subject=f"[{source}] x"))
        s.commit()
    assert reply.case_id == target and tagged.case_id == target
    assert {r["id"]: r["message_count"] for r in _list(hub)}[target] == 3
    for a, b, why in [(source, target, "already merged"), (target, target, "itself"),
                      (target, source, "was merged into")]:
        with session(hub) as s, pytest.raises(CaseInputError) as err:
            merge_cases(s, hub, a, b, actor=ACTOR)
        assert why in str(err.value)


def _list(hub: Hub, **kw: str) -> list[dict]:  # type: ignore[type-arg]
    with session(hub) as s:
        return list_cases(s, **kw)  # type: ignore[arg-type]


def test_list_filters(hub: Hub) -> None:
    a = _open(hub, clinic="Anadolu Clinic")
    b = _open(hub, email="bo@patient.example", patient_name="Bo Chen", clinic="Seoul Care")
    _set(hub, b, "status=pre-op")
    rows = _list(hub)
    assert [r["id"] for r in rows] == [b, a]
    assert set(rows[0]) >= {"id", "patient_email", "status", "message_count"}
    assert [r["id"] for r in _list(hub, status="pre-op")] == [b]
    assert [r["id"] for r in _list(hub, clinic="anadolu clinic")] == [a]
    assert [r["id"] for r in _list(hub, text="chen")] == [b]
    assert [r["id"] for r in _list(hub, text="100%_")] == []
    with pytest.raises(CaseInputError):
        _list(hub, status="nope")


def _bulk_chain(hub: Hub, cid: str, n: int) -> None:
    """A reply chain of ``n`` messages, stored NEWEST first (received order is not thread
    order): the first through ``file_message``, the rest as the same sealed rows in one
    executemany (filing itself is tested elsewhere; this keeps the test fast on PostgreSQL)."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    raws, prev = [], []
    for i in range(n):
        mid = f"<c{i}@chain.example>"
        raws.append(mail(msgid=mid, frm=PATIENT if i % 2 else CLINIC, subject=f"Re: step {i}",
                         irt=prev[-1:], refs=prev[-5:], body=f"message {i}"))
        prev.append(mid)
    with session(hub) as s:
        assert file_message(s, hub.sealer, raw=raws[0], direction="in", case_id=cid,
                            hub_domain="medvoyage.example", received_at=start) is not None
        rows = []
        for i, raw in enumerate(raws[1:], start=1):
            ident = identify(parse_message(raw), raw, "medvoyage.example")
            rows.append({
                "case_id": cid, "message_id": ident.message_id, "message_id_norm": ident.key,
                "message_id_assigned": False, "in_reply_to": prev[i - 1],
                "references": " ".join(prev[max(0, i - 5):i]), "direction": "in",
                "from_addr": PATIENT if i % 2 else CLINIC,
                "to_addrs": '["intake@medvoyage.example"]',
                "subject_sealed": hub.sealer.seal(f"Re: step {i}".encode(),
                                                  aad=subject_aad(ident.digest)),
                "body_sealed": hub.sealer.seal(raw, aad=message_aad(ident.digest)),
                "encryption": "none", "signature": "none", "signer": "", "size": len(raw),
                "digest": ident.digest, "body_digest": ident.body_digest,
                "unverified_sender": False, "thread_reason": "references", "trace": "",
                "received_at": start - timedelta(minutes=i), "sent_at": None})
        s.execute(StoredMessage.__table__.insert(), rows)  # type: ignore[attr-defined]
        s.commit()


def test_show_a_thousand_message_case_in_thread_order(hub: Hub) -> None:
    cid = _open(hub)
    _bulk_chain(hub, cid, 1000)
    with session(hub) as s:
        s.add(ScheduleEntry(case_id=cid, step="day-1", template="follow-up", timezone=
                            "America/Chicago", send_at_utc=datetime(2026, 12, 4, 15, tzinfo=UTC)))
        s.commit()
    with session(hub) as s:
        view = show_case(s, hub.sealer, cid)
    msgs = view["messages"]
    assert len(msgs) == 1000
    assert [m["message_id"] for m in msgs[:3]] == [
        "<c0@chain.example>", "<c1@chain.example>", "<c2@chain.example>"]
    assert msgs[999]["subject"] == "step 999"  # decrypted, reply prefix stripped
    assert set(msgs[0]) >= {"message_id", "direction", "from", "to", "subject", "encryption",
                            "signature"}
    assert msgs[0]["to"] == ["intake@medvoyage.example"]
    assert view["schedule"] == [{
        "case": cid, "step": "day-1", "template": "follow-up",
        "send_at_utc": "2026-12-04T15:00:00+00:00",
        "send_at_local": "2026-12-04T09:00:00-06:00", "timezone": "America/Chicago",
        "status": "pending", "reason": ""}]


def test_unknown_case(hub: Hub) -> None:
    with session(hub) as s:
        for bad in ("MT-2026-9999", "nonsense", ""):
            with pytest.raises(NotFound):
                show_case(s, hub.sealer, bad)


def test_set_reschedules_the_care_plan(hub: Hub) -> None:
    cid = _open(hub)  # hip-replacement, home zone America/Chicago
    r = _set(hub, cid, "procedure_at=2030-12-03T08:00", "procedure_tz=Europe/Istanbul")
    assert r.schedule_error is None
    with session(hub) as s:
        rows = {row["step"]: row for row in show_case(s, hub.sealer, cid)["schedule"]}
    # -14 days at 09:00 in the home zone, from the procedure's date THERE (Dec 2, 23:00)
    prep = rows["prep-guide"]
    assert (prep["send_at_local"], prep["timezone"], prep["status"]) == (
        "2030-11-18T09:00:00-06:00", "America/Chicago", "pending")
    assert prep["send_at_utc"] == "2030-11-18T15:00:00+00:00"
    assert rows["fasting-instructions"]["send_at_local"] == "2030-12-02T18:00:00+03:00"
    # moving the procedure moves its steps; closing the case cancels what is pending
    _set(hub, cid, "procedure_at=2030-12-10T08:00")
    with session(hub) as s:
        moved = {row["step"]: row for row in show_case(s, hub.sealer, cid)["schedule"]}
    assert moved["prep-guide"]["send_at_local"] == "2030-11-25T09:00:00-06:00"
    _set(hub, cid, "status=closed")
    with session(hub) as s:
        statuses = {row["status"] for row in show_case(s, hub.sealer, cid)["schedule"]}
    assert statuses <= {"cancelled"} and statuses


def test_a_schedule_problem_is_reported_and_the_change_stands(hub: Hub) -> None:
    cid = _open(hub, procedure="no-such-plan")
    r = _set(hub, cid, "procedure_at=2030-12-03T08:00", "procedure_tz=Europe/Istanbul")
    assert r.schedule_error is not None and "no-such-plan" in r.schedule_error
    assert _case(hub, cid).procedure_tz == "Europe/Istanbul"
    with session(hub) as s:
        assert show_case(s, hub.sealer, cid)["schedule"] == []
        assert audit.verify(s).ok


def test_coordinator_may_be_a_name_or_an_address(hub: Hub) -> None:
    named = _open(hub, coordinator="Lena Koch")
    assert _case(hub, named).coordinator == "Lena Koch"
    with session(hub) as s, pytest.raises(CaseInputError):
        open_case(s, patient_name="A", patient_email=PATIENT, timezone="UTC", language="en",
                  procedure="", clinic="", coordinator="lena@", actor=ACTOR)
    _set(hub, named, "coordinator=Lena@MedVoyage.example")
    with session(hub) as s:
        roles = dict(s.execute(select(Participant.address, Participant.role)
                               .where(Participant.case_id == named)).all())
    assert roles["Lena@medvoyage.example"] == "coordinator"


def test_merged_targets_follow_chains_of_merges_and_name_the_patient(hub: Hub) -> None:
    a = _open(hub, email="ana@one.example")
    b = _open(hub, email="bea@two.example", patient_name="Bea Costa")
    c = _open(hub, email="cid@three.example", patient_name="Cid Lopes")
    with session(hub) as s:
        merge_cases(s, hub, a, b, actor=ACTOR)
        merge_cases(s, hub, b, c, actor=ACTOR)
        s.commit()
    with session(hub) as s:
        assert merged_targets(s, [a, b, c, "MT-1999-0001"]) == {
            a: (c, "Cid Lopes"), b: (c, "Cid Lopes")}
        assert merged_targets(s, [c]) == {}


def test_a_single_digit_hour_is_read_as_written() -> None:
    from mailhub.cases.service import parse_local

    assert parse_local("2026-12-03T8:00") == datetime(2026, 12, 3, 8, 0)
    assert parse_local("2026-12-03 8:05:30+03:00") == datetime.fromisoformat(
        "2026-12-03T08:05:30+03:00")
    with pytest.raises(ValueError, match="like 2026-12-03T08:00"):
        parse_local("2026-12-03T800")
