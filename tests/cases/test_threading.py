"""Case assignment: the contract's order and the failure modes helpdesk tools are known for."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mailhub.cases.threading import (
    CaseIndex,
    Decision,
    Incoming,
    MemoryCaseIndex,
    assign_case,
    case_address_id,
)

HUB = "medvoyage.example"
PATIENT = "ana.silva@patient.example"
CLINIC = "dr.kaya@clinic-a.example"


def incoming(**fields: object) -> Incoming:
    base = Incoming(
        message_id="<new@patient.example>",
        in_reply_to=[],
        references=[],
        subject="Hello",
        from_addr=PATIENT,
        to_addrs=[f"intake@{HUB}"],
        hub_domain=HUB,
    )
    return replace(base, **fields)  # type: ignore[arg-type]


@pytest.fixture
def index() -> MemoryCaseIndex:
    """Two cases with a short exchange each, the clinic a partner."""
    idx = MemoryCaseIndex(partner_domains=["clinic-a.example"], year=2026)
    a = idx.open_case(PATIENT, status="pre-op")  # MT-2026-0001
    b = idx.open_case("other@patient.example")  # MT-2026-0002
    idx.add_message(a, "<a1@medvoyage.example>")
    idx.add_message(
        a, "<a2@clinic-a.example>", ["<a1@medvoyage.example>"], ["<a1@medvoyage.example>"]
    )
    idx.add_message(
        a,
        "<a3@medvoyage.example>",
        ["<a2@clinic-a.example>"],
        ["<a1@medvoyage.example>", "<a2@clinic-a.example>"],
    )
    idx.add_message(b, "<b1@medvoyage.example>")
    idx.add_participant(a, "coordinator@medvoyage.example")
    return idx


def test_memory_index_is_a_case_index(index: MemoryCaseIndex) -> None:
    assert isinstance(index, CaseIndex)


def test_subject_tag_of_an_existing_case_joins(index: MemoryCaseIndex) -> None:
    d = assign_case(incoming(subject="Re: [MT-2026-0001] Pre-op guide"), index)
    assert d == Decision("MT-2026-0001", "subject-tag", False, d.detail)


def test_tag_typed_by_hand_with_extra_text(index: MemoryCaseIndex) -> None:
    d = assign_case(incoming(subject="[ mt-2026-0001 follow up ] my x-rays"), index)
    assert (d.case_id, d.reason) == ("MT-2026-0001", "subject-tag")


def test_tag_of_an_unknown_case_falls_through(index: MemoryCaseIndex) -> None:
    d = assign_case(incoming(subject="[MT-2026-0999] hi", from_addr="new@patient.example"), index)
    assert (d.case_id, d.reason) == (None, "new-case")
    assert "MT-2026-0999" in d.detail


def test_first_existing_tag_wins(index: MemoryCaseIndex) -> None:
    d = assign_case(incoming(subject="[MT-2026-0999] Fwd: [MT-2026-0002] x"), index)
    assert d.case_id == "MT-2026-0002"


def test_tag_beats_references(index: MemoryCaseIndex) -> None:
    d = assign_case(
        incoming(subject="[MT-2026-0002]", references=["<a3@medvoyage.example>"]), index
    )
    assert (d.case_id, d.reason) == ("MT-2026-0002", "subject-tag")


def test_case_address_joins_and_beats_references(index: MemoryCaseIndex) -> None:
    msg = incoming(
        to_addrs=["someone@else.example", f"Case+mt-2026-0002@{HUB.upper()}"],
        references=["<a3@medvoyage.example>"],
    )
    d = assign_case(msg, index)
    assert (d.case_id, d.reason) == ("MT-2026-0002", "case-address")
    assert d.unverified_sender  # Ana is not in case 0002


def test_case_address_only_at_the_hub_domain(index: MemoryCaseIndex) -> None:
    assert case_address_id("case+MT-2026-0002@evil.example", HUB) is None
    assert case_address_id('"case+MT-2026-0002"@medvoyage.example', HUB) == "MT-2026-0002"
    d = assign_case(
        incoming(to_addrs=["case+MT-2026-0002@evil.example"], from_addr="x@y.example"), index
    )
    assert d.reason == "new-case"


def test_references_join(index: MemoryCaseIndex) -> None:
    d = assign_case(
        incoming(
            in_reply_to=["<a3@medvoyage.example>"],
            references=["<a1@medvoyage.example>", "<a3@medvoyage.example>"],
        ),
        index,
    )
    assert d == Decision("MT-2026-0001", "references", False, d.detail)


def test_dropped_references_still_join(index: MemoryCaseIndex) -> None:
    # the client kept only the root and an id the hub never saw
    refs = ["<a1@medvoyage.example>", "<never-seen@elsewhere.example>"]
    d = assign_case(incoming(references=refs, from_addr="x@y.example"), index)
    assert (d.case_id, d.reason) == ("MT-2026-0001", "references")


def test_references_last_known_entry_decides(index: MemoryCaseIndex) -> None:
    refs = ["<a1@medvoyage.example>", "<b1@medvoyage.example>", "<unknown@x.example>"]
    d = assign_case(incoming(references=refs), index)
    assert d.case_id == "MT-2026-0002"


def test_foreign_in_reply_to_with_the_right_references(index: MemoryCaseIndex) -> None:
    d = assign_case(
        incoming(in_reply_to=["<b1@medvoyage.example>"], references=["<a2@clinic-a.example>"]),
        index,
    )
    assert (d.case_id, d.reason) == ("MT-2026-0001", "references")


def test_in_reply_to_alone_joins(index: MemoryCaseIndex) -> None:
    d = assign_case(incoming(in_reply_to=["garbage", "<b1@medvoyage.example>"]), index)
    assert (d.case_id, d.reason) == ("MT-2026-0002", "in-reply-to")


def test_quoted_local_parts_in_message_ids(index: MemoryCaseIndex) -> None:
    idx = MemoryCaseIndex(year=2026)
    cid = idx.open_case(PATIENT)
    idx.add_message(cid, '<"01KF8JCEOCBS0045PS"@xxx.yyy.com>')
    d = assign_case(
        incoming(in_reply_to=["<01KF8JCEOCBS0045PS@xxx.yyy.com>"], from_addr="x@y.example"), idx
    )
    assert (d.case_id, d.reason) == (cid, "in-reply-to")
    # case is kept: a different-case id is a different message
    d = assign_case(
        incoming(in_reply_to=["<01kf8jceocbs0045ps@xxx.yyy.com>"], from_addr="x@y.example"), idx
    )
    assert d.reason == "new-case"


def test_reply_arriving_before_its_parent(index: MemoryCaseIndex) -> None:
    # the clinic's reply (stored first, in case 0001) names a parent the hub had not seen yet
    index.add_message("MT-2026-0001", "<late-reply@clinic-a.example>", ["<late-parent@x.example>"])
    parent = incoming(message_id="<late-parent@x.example>", from_addr=CLINIC)
    d = assign_case(parent, index)
    assert d == Decision("MT-2026-0001", "child-reference", False, d.detail)


def test_references_beat_child_reference(index: MemoryCaseIndex) -> None:
    index.add_message("MT-2026-0002", "<r@x.example>", ["<p@x.example>"])
    d = assign_case(
        incoming(message_id="<p@x.example>", references=["<a1@medvoyage.example>"]), index
    )
    assert d.case_id == "MT-2026-0001"


def test_parent_named_from_several_cases_is_ambiguous(index: MemoryCaseIndex) -> None:
    index.add_message("MT-2026-0001", "<r1@x.example>", ["<p@x.example>"])
    index.add_message("MT-2026-0002", "<r2@x.example>", ["<p@x.example>"])
    d = assign_case(incoming(message_id="<p@x.example>", from_addr="x@y.example"), index)
    assert d.reason == "new-case"
    assert "2 cases" in d.detail


def test_loops_in_references(index: MemoryCaseIndex) -> None:
    own = "<loop@patient.example>"
    refs = [own, "<b1@medvoyage.example>", own, "<b1@medvoyage.example>", own]
    d = assign_case(incoming(message_id=own, references=refs, in_reply_to=[own]), index)
    assert (d.case_id, d.reason) == ("MT-2026-0002", "references")
    only_self = incoming(
        message_id=own, references=[own, own], in_reply_to=[own], from_addr="x@y.example"
    )
    assert assign_case(only_self, index).reason == "new-case"


def test_reused_message_id_does_not_capture_replies(index: MemoryCaseIndex) -> None:
    # a reply in case 0001 names <dup@x>, which case 0001's parent first carried
    index.add_message("MT-2026-0001", "<dup@x.example>")
    index.add_message("MT-2026-0001", "<dup-reply@x.example>", ["<dup@x.example>"])
    # a different message (another patient, a broken client) reuses <dup@x>
    reuser = incoming(message_id="<dup@x.example>", from_addr="stranger@z.example")
    d = assign_case(reuser, index)
    assert (d.case_id, d.reason) == (None, "new-case")
    assert "reused" in d.detail
    second = index.file(reuser, d)
    assert second not in ("MT-2026-0001", "MT-2026-0002")
    # a later reply to <dup@x> still goes to the FIRST holder's case
    reply = incoming(message_id="<r2@x.example>", in_reply_to=["<dup@x.example>"])
    assert assign_case(reply, index).case_id == "MT-2026-0001"


def test_forward_with_the_tag_from_a_stranger_joins_unverified(index: MemoryCaseIndex) -> None:
    fwd = incoming(
        subject="Fwd: [MT-2026-0001] Your pre-op guide", from_addr="sister@family.example"
    )
    d = assign_case(fwd, index)
    assert (d.case_id, d.reason, d.unverified_sender) == ("MT-2026-0001", "subject-tag", True)
    assert "not a participant" in d.detail


def test_forward_without_tag_or_references_from_the_patient(index: MemoryCaseIndex) -> None:
    fwd = incoming(subject="Fwd: lab results", from_addr="Ana.Silva@PATIENT.example")
    d = assign_case(fwd, index)
    assert d.reason == "new-case"  # local part kept: "Ana.Silva" is not "ana.silva"
    d = assign_case(replace(fwd, from_addr=PATIENT), index)
    assert d == Decision("MT-2026-0001", "patient-open-case", False, d.detail)


def test_copied_subject_in_a_fresh_mail_does_not_join(index: MemoryCaseIndex) -> None:
    index.add_message("MT-2026-0002", "<q@other.example>")
    fresh = incoming(subject="Question about my surgery", from_addr="third@patient.example")
    d = assign_case(fresh, index)
    assert (d.case_id, d.reason) == (None, "new-case")
    d = assign_case(replace(fresh, subject="Re: Question about my surgery"), index)
    assert d.case_id is None


def test_patient_with_two_open_cases_opens_a_new_one(index: MemoryCaseIndex) -> None:
    index.open_case(PATIENT)
    d = assign_case(incoming(), index)
    assert (d.case_id, d.reason) == (None, "new-case")
    assert "2 open cases" in d.detail


def test_closed_case_is_not_an_open_case(index: MemoryCaseIndex) -> None:
    index.set_status("MT-2026-0001", "closed")
    assert assign_case(incoming(), index).reason == "new-case"
    # but its tag still joins
    assert assign_case(incoming(subject="[MT-2026-0001]"), index).case_id == "MT-2026-0001"


def test_partner_and_participant_senders_are_verified(index: MemoryCaseIndex) -> None:
    tag = "[MT-2026-0002] records"
    assert not assign_case(incoming(subject=tag, from_addr=CLINIC), index).unverified_sender
    assert assign_case(
        incoming(subject=tag, from_addr="x@clinic-b.example"), index
    ).unverified_sender
    assert assign_case(incoming(subject=tag, from_addr=""), index).unverified_sender
    index.add_participant("MT-2026-0002", "x@clinic-b.example")
    assert not assign_case(
        incoming(subject=tag, from_addr="x@Clinic-B.example"), index
    ).unverified_sender


class CountingIndex(MemoryCaseIndex):
    """A real index that also records how many ids each look-up was asked about."""

    def __init__(self) -> None:
        super().__init__(year=2026)
        self.asked: list[int] = []

    def cases_for_message_ids(self, msgids: list[str]) -> dict[str, str]:
        self.asked.append(len(msgids))
        return super().cases_for_message_ids(msgids)


def test_five_thousand_references_cost_one_bounded_look_up() -> None:
    idx = CountingIndex()
    cid = idx.open_case(PATIENT)
    idx.add_message(cid, "<ref4990@x.example>")
    refs = [f"<ref{i}@x.example>" for i in range(5000)]
    d = assign_case(incoming(references=refs, from_addr="x@y.example"), idx)
    assert (d.case_id, d.reason) == (cid, "references")
    assert idx.asked == [101]  # last 100 references + own Message-ID


def test_only_the_last_hundred_references_are_consulted() -> None:
    idx = MemoryCaseIndex(year=2026)
    cid = idx.open_case(PATIENT)
    idx.add_message(cid, "<ref0@x.example>")  # the thread root, 5,000 entries back
    refs = [f"<ref{i}@x.example>" for i in range(5000)]
    d = assign_case(incoming(references=refs, from_addr="x@y.example"), idx)
    assert d.reason == "new-case"  # documented cap: the root is beyond the last 100


def test_ten_kilobyte_subject(index: MemoryCaseIndex) -> None:
    subject = ("Re: " * 1000) + ("x" * 6000) + " [MT-2026-0002]"
    assert len(subject) > 10_000
    d = assign_case(incoming(subject=subject), index)
    assert (d.case_id, d.reason) == ("MT-2026-0002", "subject-tag")
    d = assign_case(incoming(subject="[" * 10_240, from_addr="x@y.example"), index)
    assert d.reason == "new-case"


def test_garbage_everywhere_never_raises(index: MemoryCaseIndex) -> None:
    msg = incoming(
        message_id="\x00<<>>",
        in_reply_to=["\udcff<a@"],
        references=["(((", "<>"],
        subject="\udc80" * 100,
        from_addr="<<@@>>",
        to_addrs=["", "case+@"],
    )
    assert assign_case(msg, index).reason == "new-case"
