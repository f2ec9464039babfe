"""From raw (hostile) messages to a decision, and a replayed mail flow on the memory index."""

from __future__ import annotations

from email import message_from_bytes, policy
from email.message import Message

import pytest

from mailhub.cases.threading import MemoryCaseIndex, assign_case, incoming_from_message

HUB = "medvoyage.example"


def msg(raw: bytes, pol: policy.Policy = policy.default) -> Message:
    return message_from_bytes(raw, policy=pol)


@pytest.mark.parametrize("pol", [policy.compat32, policy.default])
def test_broken_encodings_still_give_a_usable_incoming(pol: policy.Policy) -> None:
    raw = (
        b"From: =?bogus-charset?q?Ana_=E9?= <Ana@Patient.EXAMPLE>\r\n"
        b"To: =?utf-8?b?!!!?= <case+mt-2026-0001@MedVoyage.example>, \xff\xfe <x@y.example>\r\n"
        b"Subject: =?utf-8?q?=5BMT-2026-0001=5D_r=C3=A9sultats?= \xe9t\xe9\r\n"
        b'Message-ID: (comment) <"abc"@patient.example>\r\n'
        b"In-Reply-To: Your message of Monday <irt@hub.example> \xff\r\n"
        b"References: <r1@x> garbage\r\n <r2@x> <r1@x>\r\n\r\nbody\r\n"
    )
    inc = incoming_from_message(msg(raw, pol), HUB, recipients=["intake@medvoyage.example"])
    assert inc.message_id == "<abc@patient.example>"
    assert inc.in_reply_to == ["<irt@hub.example>"]
    assert inc.references == ["<r1@x>", "<r2@x>"]
    assert inc.from_addr == "Ana@patient.example"
    assert inc.to_addrs == [
        "intake@medvoyage.example",
        "case+mt-2026-0001@medvoyage.example",
        "x@y.example",
    ]
    assert inc.subject.startswith("[MT-2026-0001] résultats ")
    assert "\ufffd" in inc.subject  # the raw 8-bit Latin-1 bytes, not UTF-8
    idx = MemoryCaseIndex(year=2026)
    cid = idx.open_case("someone@else.example")
    d = assign_case(inc, idx)
    assert (d.case_id, d.reason, d.unverified_sender) == (cid, "subject-tag", True)


def test_missing_headers_and_envelope_sender() -> None:
    inc = incoming_from_message(
        msg(b"\r\nno headers at all\r\n"), HUB, envelope_from="b@Bounce.example"
    )
    assert (inc.message_id, inc.subject, inc.from_addr) == (None, "", "b@bounce.example")
    assert inc.in_reply_to == [] and inc.references == [] and inc.to_addrs == []


def test_ten_kilobyte_subject_and_five_thousand_references_from_raw() -> None:
    refs = b"\r\n ".join(b"<ref%d@x.example>" % i for i in range(5000))
    raw = (
        b"From: a@b.example\r\nSubject: " + b"y" * 10_240 + b"\r\nReferences: " + refs + b"\r\n\r\n"
    )
    inc = incoming_from_message(msg(raw), HUB)
    assert len(inc.subject) == 2000
    assert len(inc.references) == 100 and inc.references[-1] == "<ref4999@x.example>"


def test_replayed_flow_threads_every_message_into_the_right_case() -> None:
    """A coordinator writes, the clinic answers from a client that drops References, the
    patient replies to an old message, an unrelated patient copies the subject."""
    idx = MemoryCaseIndex(partner_domains=["clinic-a.example"], year=2026)
    case = idx.open_case("ana@patient.example")
    # outbound: the hub stores the coordinator's message with the client's Message-ID
    idx.add_message(case, "<out1@medvoyage.example>")
    idx.add_participant(case, "dr@clinic-a.example")

    def deliver(raw: bytes) -> str:
        inc = incoming_from_message(msg(raw), HUB)
        return idx.file(inc, assign_case(inc, idx))

    clinic = (
        b"From: Dr <dr@clinic-a.example>\r\nTo: intake@medvoyage.example\r\n"
        b"Subject: RE: Pre-op\r\nMessage-ID: <c1@clinic-a.example>\r\n"
        b"In-Reply-To: <out1@medvoyage.example>\r\n\r\nx"
    )
    assert deliver(clinic) == case
    patient = (
        b"From: ana@patient.example\r\nTo: intake@medvoyage.example\r\nSubject: AW: Pre-op\r\n"
        b"Message-ID: <p1@patient.example>\r\nReferences: <lost@nowhere> <c1@clinic-a.example>\r\n\r\nx"
    )
    assert deliver(patient) == case
    copycat = (
        b"From: ben@patient.example\r\nTo: intake@medvoyage.example\r\nSubject: Pre-op\r\n"
        b"Message-ID: <z1@patient.example>\r\n\r\nx"
    )
    other = deliver(copycat)
    assert other != case
    follow_up = (
        b"From: ben@patient.example\r\nTo: intake@medvoyage.example\r\nSubject: more\r\n"
        b"Message-ID: <z2@patient.example>\r\n\r\nx"
    )
    assert deliver(follow_up) == other  # Ben's one open (inquiry) case
