"""Batch filing (``file_outbound_many`` over ``PrefetchedIndex``) decides what one-at-a-time
filing decides, on SQLite and a real PostgreSQL.

The serving process files coordinators' messages in batches, answering the case index's
questions for the whole batch with three queries. Any difference from filing the messages
one by one (``file_outbound``, and ``outbound_case`` over the plain ``SqlCaseIndex``) would
put a message in the wrong patient's case, so each scenario is run both ways on the same
data (each run rolled back) and the returned cases, stored rows and ``filed`` audit entries
compared, besides the expected answers written out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from mailhub.app import Hub
from mailhub.cases.filing import (
    OutboundItem,
    file_inbound,
    file_outbound,
    file_outbound_many,
    outbound_case,
)
from mailhub.cases.prefetch import PrefetchedIndex
from mailhub.cases.service import merge_cases, open_case, resolve_merged
from mailhub.cases.store import SqlCaseIndex, msgid_key, parse_headers
from mailhub.parse.headers import addresses, normalize_address, raw_headers, safe_header
from mailhub.parse.msgid import parse_msgid_list
from mailhub.store.audit import AuditEntry, verify
from mailhub.store.models import StoredMessage
from tests.cases.case_support import (  # noqa: F401
    CLINIC,
    COORD,
    HUB_DOMAIN,
    PATIENT,
    hub_fixture,
    mail,
    session,
)

ACTOR = "test"
TWO = "two@patient.example"  # the patient of two open cases
CLOSED = "closed@patient.example"  # the patient of a closed case only
MERGED = "merged@patient.example"  # the patient of a case merged into another
OTHER = "eve@patient.example"  # the patient of exactly one other open case
MIXED = "Maria@Patient.Example"  # stored normalized as Maria@patient.example
STRANGER = "nobody@else.example"
LONG_ID = f"<{'x' * 450}@eve.example>"  # indexed by a digest, not as written


@dataclass(frozen=True)
class World:
    """The case ids of ``_world``."""

    ana: str
    two_a: str
    two_b: str
    closed: str
    merged: str
    into: str
    eve: str
    maria: str


def _open(s: Any, email: str, status: str = "pre-op") -> str:
    case = open_case(s, patient_name="P", patient_email=email, timezone="Europe/Lisbon",
                     language="pt", procedure="hip-replacement", clinic="Clinic A",
                     coordinator=COORD, status=status, actor=ACTOR)
    s.flush()
    return case.id


def _world(hub: Hub) -> World:
    """Cases for every rule, and two inbound messages that later mail refers to."""
    with session(hub) as s:
        ana = _open(s, PATIENT)
        two_a, two_b = _open(s, TWO), _open(s, TWO)
        closed = _open(s, CLOSED, status="closed")
        into = _open(s, "into@patient.example")
        merged = _open(s, MERGED)
        eve = _open(s, OTHER)
        maria = _open(s, MIXED)
        s.commit()
        merge_cases(s, hub, merged, into, actor=ACTOR)
        s.commit()
    for raw in (mail(msgid="<root-a@patient.example>", subject=f"[{ana}] start"),
                mail(msgid="<root-b@two.example>", frm=TWO, subject=f"[{two_b}] start"),
                mail(msgid="<root-m@merged.example>", frm=MERGED, subject=f"[{merged}] x"),
                mail(msgid=LONG_ID, frm=OTHER, subject=f"[{eve}] long")):
        with session(hub) as s:
            file_inbound(s, hub, raw)
            s.commit()
    return World(ana, two_a, two_b, closed, merged, into, eve, maria)


def _out(n: int, *, to: tuple[str, ...] = (CLINIC,), subject: str = "Note",
         refs: tuple[str, ...] = (), irt: tuple[str, ...] = ()) -> OutboundItem:
    raw = mail(msgid=f"<out-{n}@medvoyage.example>", frm=COORD, name="Lena", to=to,
               subject=subject, body=f"note {n}", refs=refs, irt=irt)
    return OutboundItem(raw, COORD, list(to))


def _scenarios(w: World) -> list[tuple[OutboundItem, str | None, str]]:
    """(message, expected case, expected reason): one for every rule and every miss."""
    case_addr = f"case+{w.eve.lower()}@{HUB_DOMAIN}"
    return [
        (_out(1, subject=f"RE: [{w.ana}] bloods"), w.ana, "subject-tag"),
        (_out(2, subject="[MT-2001-9999] no such case", to=(STRANGER,)), None, ""),
        (_out(3, to=(case_addr,)), w.eve, "case-address"),
        (_out(4, to=(f"CASE+{w.eve}@{HUB_DOMAIN.upper()}",)), w.eve, "case-address"),
        (_out(5, refs=("<unknown@x.example>", "<root-b@two.example>")), w.two_b, "references"),
        (_out(6, irt=("<root-a@patient.example>",)), w.ana, "in-reply-to"),
        (_out(7, refs=("<root-a@patient.example>",), irt=("<root-b@two.example>",)),
         w.ana, "references"),
        (_out(8, to=(PATIENT,)), w.ana, "patient-open-case"),
        (_out(9, to=(TWO,)), None, ""),  # two open cases: ambiguous
        (_out(10, to=(STRANGER,)), None, ""),
        (_out(11, to=(CLOSED,)), None, ""),  # a closed case is not open
        (_out(12, subject=f"[{w.closed}] after care"), w.closed, "subject-tag"),
        (_out(13, subject=f"[{w.merged}] old tag"), w.into, "subject-tag"),  # follows the merge
        (_out(14, to=(MERGED,)), None, ""),  # the merged case is not open
        (_out(15, refs=("<root-m@merged.example>",)), w.into, "references"),
        (_out(16, to=("ana.silva@PATIENT.Example",)), w.ana, "patient-open-case"),
        (_out(17, to=("maria@patient.example",)), None, ""),  # the local part keeps its case
        (_out(18, to=("Maria@PATIENT.example",)), w.maria, "patient-open-case"),
        (_out(19, to=(PATIENT, TWO)), w.ana, "patient-open-case"),  # TWO is ambiguous alone
        (_out(20, to=(PATIENT, OTHER)), None, ""),  # two patients, two cases: no guess
        (_out(21, to=(STRANGER, f"Ana <{PATIENT}>")), w.ana, "patient-open-case"),
        (_out(22, subject=f"[{w.eve}] and [{w.ana}]", to=(PATIENT,)), w.eve, "subject-tag"),
        (_out(23, to=(PATIENT,), irt=(LONG_ID,)), w.eve, "in-reply-to"),
    ]


def _filed(hub: Hub, s: Any) -> tuple[list[tuple[str, str, str]], list[tuple[str, ...]]]:
    """Stored outbound rows and ``filed`` audit entries (what differs run to run left out)."""
    rows = sorted((m.message_id, m.case_id, m.thread_reason) for m in s.execute(
        select(StoredMessage).where(StoredMessage.direction == "out")).scalars())
    entries = [(e.actor, e.action, e.message_id or "", e.case_id or "", e.detail)
               for e in s.execute(select(AuditEntry).where(AuditEntry.action == "filed", AuditEntry.actor == ACTOR)
                                  .order_by(AuditEntry.seq)).scalars()]
    return rows, entries


def _reference(hub: Hub, s: Any, item: OutboundItem) -> tuple[str | None, str]:
    """What ``outbound_case`` decides over the per-question SQL index (no prefetch), with a
    merged case followed to where its mail goes now."""
    msg = parse_headers(item.raw)
    rcpts = [a for a in (normalize_address(r) for r in item.recipients) if a]
    rcpts += [a for a in addresses(msg, "To", "Cc") if a not in rcpts]
    refs = parse_msgid_list(" ".join(raw_headers(msg, "References")))
    irt = parse_msgid_list(" ".join(raw_headers(msg, "In-Reply-To")))
    case, why = outbound_case(SqlCaseIndex(s, hub.domain), safe_header(msg, "Subject"), rcpts,
                              refs, irt)
    return (None if case is None else resolve_merged(s, case)), why


def test_batch_decides_as_one_at_a_time(hub: Hub) -> None:
    w = _world(hub)
    scenarios = _scenarios(w)
    items = [item for item, _, _ in scenarios]
    with session(hub) as s:
        decided = [_reference(hub, s, item) for item in items]
    assert decided == [(case, why) for _, case, why in scenarios]

    with session(hub) as s:
        batch = file_outbound_many(s, hub, items, actor=ACTOR)
        batch_filed = _filed(hub, s)
        s.rollback()
    with session(hub) as s:
        single = [file_outbound(s, hub, i.raw, i.sender, i.recipients, actor=ACTOR)
                  for i in items]
        single_filed = _filed(hub, s)
        s.rollback()
    assert batch == single == [case for _, case, _ in scenarios]
    assert batch_filed == single_filed
    stored = {mid: (case, why) for mid, case, why in batch_filed[0]}
    assert stored == {f"<out-{n}@medvoyage.example>": (case, why)
                      for n, (_, case, why) in enumerate(scenarios, 1) if case is not None}
    assert [e[2] for e in batch_filed[1]] == [f"<out-{n}@medvoyage.example>"
                                              for n, (_, c, _) in enumerate(scenarios, 1) if c]


def test_batch_commits_a_verifiable_chain_and_replays_as_duplicates(hub: Hub) -> None:
    w = _world(hub)
    items = [item for item, _, _ in _scenarios(w)]
    with session(hub) as s:
        first = file_outbound_many(s, hub, items, actor=ACTOR)
        s.commit()
        rows_before, filed_before = _filed(hub, s)
    with session(hub) as s:  # a replay after a crash: same cases, nothing stored twice
        again = file_outbound_many(s, hub, items, actor=ACTOR)
        s.commit()
        assert again == first
        assert _filed(hub, s) == (rows_before, filed_before)
        result = verify(s)
        assert result.ok, result.problem


def test_same_message_twice_in_one_batch_is_stored_once(hub: Hub) -> None:
    w = _world(hub)
    item = _out(1, subject=f"[{w.ana}] twice")
    with session(hub) as s:
        assert file_outbound_many(s, hub, [item, item], actor=ACTOR) == [w.ana, w.ana]
        rows, entries = _filed(hub, s)
        s.commit()
    assert rows == [("<out-1@medvoyage.example>", w.ana, "subject-tag")]
    assert len(entries) == 1


def test_reply_to_a_message_earlier_in_the_same_batch(hub: Hub) -> None:
    """A follow-up filed in the same batch as the message it answers: one at a time, the
    first is stored before the second is decided, so the reply joins its case."""
    w = _world(hub)
    first = _out(1, subject=f"[{w.ana}] plan")
    reply = _out(2, subject="Re: plan", irt=("<out-1@medvoyage.example>",))
    with session(hub) as s:
        single = [file_outbound(s, hub, i.raw, i.sender, i.recipients, actor=ACTOR)
                  for i in (first, reply)]
        s.rollback()
    assert single == [w.ana, w.ana]
    with session(hub) as s:
        batch = file_outbound_many(s, hub, [first, reply], actor=ACTOR)
        s.rollback()
    assert batch == single


def test_prefetched_index_answers_only_what_it_was_asked(hub: Hub) -> None:
    w = _world(hub)
    with session(hub) as s:
        index = PrefetchedIndex(s, f" {HUB_DOMAIN.upper()}. ", case_ids=[w.ana, "MT-2001-9999"],
                                message_ids=["<root-a@patient.example>", "<nope@x.example>"],
                                emails=[TWO, f"Ana <{OTHER}>", "ANA.SILVA@Patient.Example",
                                        "not an address"])
        sql = SqlCaseIndex(s, HUB_DOMAIN)
        assert index.hub_domain == sql.hub_domain == HUB_DOMAIN
        assert index.case_exists(w.ana) and not index.case_exists("MT-2001-9999")
        assert not index.case_exists(w.eve)  # exists, but was not asked for
        assert index.cases_for_message_ids(["<root-a@patient.example>", "<nope@x.example>"]) \
            == sql.cases_for_message_ids(["<root-a@patient.example>", "<nope@x.example>"]) \
            == {"<root-a@patient.example>": w.ana}
        assert index.open_cases_for_patient(TWO) == sql.open_cases_for_patient(TWO) \
            == [w.two_a, w.two_b]
        # asked as ANA.SILVA@...: the local part keeps its case, so that is another address
        assert index.open_cases_for_patient("ANA.SILVA@patient.example") == []
        assert index.open_cases_for_patient(PATIENT) == []  # not asked for (so: none)
        assert sql.open_cases_for_patient(PATIENT) == [w.ana]
        assert index.open_cases_for_patient("not an address") == []
        assert index.open_cases_for_patient(OTHER) == []  # "Ana <...>" is not an address
        long_known = index.cases_for_message_ids([LONG_ID])
        assert long_known == {}  # not asked for
        asked = PrefetchedIndex(s, HUB_DOMAIN, case_ids=[], message_ids=[LONG_ID], emails=[])
        assert asked.cases_for_message_ids([LONG_ID]) == {LONG_ID: w.eve}
        # what the batch stores itself is learnt; the first holder of an id keeps it
        asked.learn(msgid_key("<new@medvoyage.example>"), w.ana)
        asked.learn(msgid_key(LONG_ID), w.ana)
        assert asked.cases_for_message_ids(["<new@medvoyage.example>", LONG_ID]) == {
            "<new@medvoyage.example>": w.ana, LONG_ID: w.eve}
        empty = PrefetchedIndex(s, HUB_DOMAIN, case_ids=[], message_ids=[], emails=[])
        assert not empty.case_exists(w.ana) and empty.open_cases_for_patient(PATIENT) == []
        assert empty.cases_for_message_ids(["<root-a@patient.example>"]) == {}
