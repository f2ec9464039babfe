"""Threading through the SQL case index, on SQLite and a real PostgreSQL.

The same scenarios as the pure threading tests, but every answer comes from the database:
tag, case+ID address, dropped References, foreign In-Reply-To, parent after reply, reused
Message-ID, the patient's one open case, a new inquiry, unverified senders.
"""

from __future__ import annotations

from dataclasses import replace

from sqlalchemy import func, select

from mailhub.app import Hub
from mailhub.cases.filing import file_inbound, file_outbound
from mailhub.cases.service import create_case, open_case
from mailhub.cases.store import SqlCaseIndex
from mailhub.cases.threading import CaseIndex, MemoryCaseIndex, assign_case
from mailhub.crypto.protection import Protection
from mailhub.store.models import Case, Participant, StoredMessage
from tests.cases.case_support import (  # noqa: F401
    CLINIC,
    COORD,
    HUB_DOMAIN,
    INTAKE,
    PATIENT,
    hub_fixture,
    mail,
    session,
)

ACTOR = "test"


def _open(hub: Hub, email: str = PATIENT, status: str = "pre-op") -> str:
    with session(hub) as s:
        case = open_case(s, patient_name="Ana Silva", patient_email=email, timezone="Europe/Lisbon",
                         language="pt", procedure="hip-replacement", clinic="Clinic A",
                         coordinator=COORD, status=status, actor=ACTOR)
        s.commit()
        return case.id


def _in(hub: Hub, raw: bytes, protection: Protection | None = None):  # type: ignore[no-untyped-def]
    with session(hub) as s:
        result = file_inbound(s, hub, raw, protection)
        s.commit()
        return result


def _participants(hub: Hub, case_id: str) -> set[str]:
    with session(hub) as s:
        return set(s.execute(select(Participant.address)
                             .where(Participant.case_id == case_id)).scalars())


def test_sql_index_is_a_case_index(hub: Hub) -> None:
    with session(hub) as s:
        assert isinstance(SqlCaseIndex(s, HUB_DOMAIN, ["clinic-a.example"]), CaseIndex)


def test_new_inquiry_then_reply_then_patient_open_case(hub: Hub) -> None:
    first = _in(hub, mail(msgid="<q1@patient.example>", subject="Question about my surgery"))
    assert first.created_case and first.reason == "new-case"
    assert first.patient_name == "Ana Silva"
    with session(hub) as s:
        case = s.get(Case, first.case_id)
        assert case is not None and case.status == "inquiry"
    # a fresh mail from the same patient (no ids, copied subject): the one open case
    again = _in(hub, mail(msgid="<q2@patient.example>", subject="Question about my surgery"))
    assert (again.case_id, again.reason, again.created_case) == (
        first.case_id, "patient-open-case", False)
    # someone else with the very same subject does not join: subjects never join
    other = _in(hub, mail(msgid="<o1@else.example>", frm="bob@else.example", name="Bob",
                          subject="Question about my surgery"))
    assert other.created_case and other.case_id != first.case_id


def test_subject_tag_and_unverified_sender(hub: Hub) -> None:
    cid = _open(hub)
    ok = _in(hub, mail(msgid="<t1@clinic-a.example>", frm=CLINIC, name="Dr Kaya",
                       subject=f"RE: [{cid}] Pre-op results"))
    assert (ok.case_id, ok.reason, ok.unverified) == (cid, "subject-tag", False)
    # a tag typed by hand, with extra words, by a stranger: filed but marked, not a participant
    odd = _in(hub, mail(msgid="<t2@evil.example>", frm="mallory@evil.example", name="M",
                        subject=f"[ {cid.lower()} follow up ] hello"))
    assert (odd.case_id, odd.reason, odd.unverified) == (cid, "subject-tag", True)
    parts = _participants(hub, cid)
    assert CLINIC in parts and PATIENT in parts and COORD in parts
    assert "mallory@evil.example" not in parts
    with session(hub) as s:
        row = s.get(StoredMessage, odd.message_pk)
        assert row is not None and row.unverified_sender


def test_case_address(hub: Hub) -> None:
    cid = _open(hub)
    r = _in(hub, mail(msgid="<ca1@patient.example>", to=[f"case+{cid.lower()}@{HUB_DOMAIN}"],
                      frm="sister@family.example", name="Sister"))
    assert (r.case_id, r.reason, r.unverified) == (cid, "case-address", True)


def test_dropped_references_and_foreign_in_reply_to(hub: Hub) -> None:
    cid = _open(hub)
    other = _open(hub, email="someone@else.example")
    _in(hub, mail(msgid="<root@patient.example>", subject="start"))
    _in(hub, mail(msgid="<b-root@else.example>", frm="someone@else.example", subject="x"))
    # the clinic's client kept only the root and an id the hub never saw
    r = _in(hub, mail(msgid="<r2@clinic-a.example>", frm=CLINIC, subject="Re: start",
                      refs=["<root@patient.example>", "<never-seen@x.example>"]))
    assert (r.case_id, r.reason) == (cid, "references")
    # a foreign In-Reply-To (points at the other case) with the right References: References win
    r = _in(hub, mail(msgid="<r3@clinic-a.example>", frm=CLINIC, subject="Re: start",
                      irt=["<b-root@else.example>"], refs=["<r2@clinic-a.example>"]))
    assert (r.case_id, r.reason) == (cid, "references")
    r = _in(hub, mail(msgid="<r4@clinic-a.example>", frm=CLINIC, irt=["<b-root@else.example>"]))
    assert (r.case_id, r.reason) == (other, "in-reply-to")


def test_parent_arriving_after_its_reply(hub: Hub) -> None:
    cid = _open(hub)
    reply = _in(hub, mail(msgid="<late-reply@clinic-a.example>", frm=CLINIC,
                          subject=f"[{cid}] answer", irt=["<late-parent@partner.example>"]))
    assert reply.case_id == cid
    parent = _in(hub, mail(msgid="<late-parent@partner.example>", frm="x@unrelated.example",
                           name="X", subject="question"))
    assert (parent.case_id, parent.reason, parent.unverified) == (cid, "child-reference", True)


def test_reused_message_id_is_stored_and_captures_nothing(hub: Hub) -> None:
    cid = _open(hub)
    first = _in(hub, mail(msgid="<dup@x.example>", subject=f"[{cid}] first", body="one"))
    reuser = _in(hub, mail(msgid="<dup@x.example>", frm="stranger@z.example", name="Z",
                           subject="unrelated", body="another message entirely"))
    assert not reuser.duplicate and reuser.message_pk != first.message_pk
    assert reuser.case_id != cid  # its own new case: a reused id is not a parent
    reply = _in(hub, mail(msgid="<dup-reply@clinic-a.example>", frm=CLINIC,
                          irt=["<dup@x.example>"], subject="Re: first"))
    assert reply.case_id == cid  # the FIRST holder of the id wins


def test_message_ids_compare_as_rfc5322_says(hub: Hub) -> None:
    cid = _open(hub)
    _in(hub, mail(msgid='<"01KF8JCEOCBS0045PS"@xxx.yyy.com>', subject=f"[{cid}] x"))
    r = _in(hub, mail(msgid="<q@clinic-a.example>", frm=CLINIC,
                      irt=["<01KF8JCEOCBS0045PS@xxx.yyy.com>"]))
    assert (r.case_id, r.reason) == (cid, "in-reply-to")
    r = _in(hub, mail(msgid="<q2@n.example>", frm="n@n.example", name="N",
                      irt=["<01kf8jceocbs0045ps@xxx.yyy.com>"]))
    assert r.reason == "new-case"  # case is kept


def test_closed_and_merged_cases(hub: Hub) -> None:
    with session(hub) as s:
        closed = create_case(s, patient_name="A", patient_email=PATIENT, actor=ACTOR,
                             status="closed").id
        s.commit()
    r = _in(hub, mail(msgid="<c1@patient.example>"))
    assert r.created_case and r.case_id != closed  # a closed case is not "the open case"
    with session(hub) as s:
        s.get(Case, closed).merged_into = r.case_id  # type: ignore[union-attr]
        s.commit()
    tagged = _in(hub, mail(msgid="<c2@clinic-a.example>", frm=CLINIC, subject=f"[{closed}]"))
    assert tagged.case_id == r.case_id  # a merged case's mail goes where it was merged


def test_outbound_case_mail_and_the_reply(hub: Hub) -> None:
    cid = _open(hub)
    with session(hub) as s:
        # the patient has exactly one open case: the coordinator's mail to her is case mail
        out = file_outbound(s, hub, mail(msgid="<out1@medvoyage.example>", frm=COORD,
                                         to=[PATIENT], subject="Your pre-op guide", name="Lena"),
                            COORD, [PATIENT], protection=Protection("openpgp", "none"))
        plain = file_outbound(s, hub, mail(msgid="<out2@medvoyage.example>", frm=COORD,
                                           to=["bookings@airline.example"], subject="Seats"),
                              COORD, ["bookings@airline.example"])
        s.commit()
    assert (out, plain) == (cid, None)
    reply = _in(hub, mail(msgid="<back@patient.example>", subject="Re: Your pre-op guide",
                          irt=["<out1@medvoyage.example>"], refs=["<out1@medvoyage.example>"]))
    assert (reply.case_id, reply.reason) == (cid, "references")
    with session(hub) as s:
        row = s.execute(select(StoredMessage).where(
            StoredMessage.message_id == "<out1@medvoyage.example>")).scalar_one()
        assert (row.direction, row.encryption, row.case_id) == ("out", "openpgp", cid)
        n = s.execute(select(func.count()).select_from(StoredMessage)).scalar()
        assert n == 2


def test_sql_index_answers_like_the_memory_index(hub: Hub) -> None:
    """Replay one flow into both indexes; every probe gets the same decision."""
    mem = MemoryCaseIndex(partner_domains=["clinic-a.example"])
    flow = [
        mail(msgid="<f1@patient.example>", subject="hi"),
        mail(msgid="<f2@clinic-a.example>", frm=CLINIC, irt=["<f1@patient.example>"]),
        mail(msgid="<g1@other.example>", frm="other@other.example", name="O"),
        mail(msgid="<f3@patient.example>", refs=["<f1@patient.example>", "<f2@clinic-a.example>"]),
    ]
    from mailhub.cases.store import parse_message
    from mailhub.cases.threading import incoming_from_message

    for raw in flow:
        r = _in(hub, raw)
        inc = incoming_from_message(parse_message(raw), HUB_DOMAIN)
        d = assign_case(inc, mem)
        if d.case_id is None:
            d = replace(d, case_id=mem.open_case(inc.from_addr))
        assert d.case_id == r.case_id  # same decisions, same numbering
        mem.file(inc, d)
    probes = [
        mail(msgid="<p1@x.example>", frm="x@x.example", refs=["<f2@clinic-a.example>"]),
        mail(msgid="<p2@x.example>", frm="x@x.example", irt=["<g1@other.example>"]),
        mail(msgid="<p3@x.example>", frm="other@other.example"),
        mail(msgid="<p4@x.example>", frm="new@x.example", subject="[MT-1999-0001] no case"),
        mail(msgid="<f1@patient.example>", frm="x@x.example", body="reused id"),
        mail(msgid="<p5@clinic-a.example>", frm="lab@clinic-a.example",
             subject=f"[{_first_case(hub)}]"),
    ]
    with session(hub) as s:
        sql = SqlCaseIndex(s, HUB_DOMAIN, ["clinic-a.example"])
        for raw in probes:
            inc = incoming_from_message(parse_message(raw), HUB_DOMAIN)
            a, b = assign_case(inc, sql), assign_case(inc, mem)
            assert (a.case_id, a.reason, a.unverified_sender) == (
                b.case_id, b.reason, b.unverified_sender), raw[:80]


def _first_case(hub: Hub) -> str:
    with session(hub) as s:
        return s.execute(select(Case.id).order_by(Case.id)).scalars().first() or ""


def test_participants_are_added_once(hub: Hub) -> None:
    cid = _open(hub)
    for i in range(3):
        _in(hub, mail(msgid=f"<pp{i}@clinic-a.example>", frm=CLINIC, to=[INTAKE, "x@y.example"],
                      subject=f"[{cid}] {i}"))
    with session(hub) as s:
        rows = s.execute(select(Participant.address, Participant.role)
                         .where(Participant.case_id == cid)).all()
    roles = dict(rows)
    assert len(rows) == len(roles)
    assert roles[CLINIC] == "clinic" and roles[PATIENT] == "patient"
    assert roles[INTAKE] == "coordinator" and roles["x@y.example"] == "other"
