"""``QueueWriter.write_many`` and the delivery outcomes' audit entries, on SQLite and a real
PostgreSQL.

The relay writes the rows of a whole batch of messages with a handful of statements. What each
message gets must not change with batching: one row per (source id, recipient), one sealed
payload per distinct ciphertext bound to its row id, a notice to the sender for each held
copy, an audit entry for each decision naming its queue row, and nothing twice on a replay.
Sent and failed outcomes are audited too, one entry per row.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select
from sqlmodel import Session

from mailhub.app import Hub
from mailhub.deliver.fresh import AFTER_COMMIT, FreshPayloads
from mailhub.deliver.queue import mark_failed_in, mark_sent_in, mark_sent_many
from mailhub.errors import CryptoError
from mailhub.outbound.queueing import QueueWriter, RowSpec, WriteJob
from mailhub.store.audit import AuditEntry, verify
from mailhub.store.models import OutboundItem, Payload
from tests.cases.case_support import hub_fixture, session  # noqa: F401

SENDER = "lena@medvoyage.example"


def _jobs() -> list[WriteJob]:
    """Three messages: a shared ciphertext plus a plaintext copy; two held copies sharing the
    original; one encrypted copy in a case (and a repeated recipient, written once)."""
    shared = b"-----BEGIN PGP MESSAGE----- (group ciphertext for a)"
    plain = b"Subject: travel dates\r\n\r\nplaintext for the airline (a)"
    original = b"Subject: held\r\n\r\nthe original of b, kept sealed while held"
    single = b"S/MIME ciphertext for c"
    return [
        WriteJob("spool-a", "<a@medvoyage.example>", SENDER, [
            RowSpec("dr.kaya@clinic-a.example", "queued", "openpgp", "smarthost", shared,
                    require_tls=True, trace='[{"rule": "partner"}]'),
            RowSpec("lab@clinic-a.example", "queued", "openpgp", "smarthost", shared),
            RowSpec("bookings@airline.example", "queued", "plaintext", "smarthost", plain,
                    reason="plaintext exception"),
        ]),
        WriteJob("spool-b", "<b@medvoyage.example>", SENDER, [
            RowSpec("ana@patient.example", "held", "", "smarthost", original,
                    reason="no key for ana@patient.example"),
            RowSpec("dr.x@clinic-b.example", "held", "openpgp", "smarthost", original,
                    reason="openpgp encryption failed: expired key"),
        ], case_id=None),
        WriteJob("spool-c", "<c@medvoyage.example>", SENDER, [
            RowSpec("dr.y@clinic-c.example", "queued", "smime", "smarthost", single),
            RowSpec("dr.y@clinic-c.example", "queued", "smime", "smarthost", single),
        ], case_id="MT-2026-0001"),
    ]


def _rows(s: Session) -> list[OutboundItem]:
    return list(s.execute(select(OutboundItem).order_by(OutboundItem.id)).scalars())


def _audit(s: Session) -> list[AuditEntry]:
    return list(s.execute(select(AuditEntry).order_by(AuditEntry.seq)).scalars())


def _count(s: Session, table: Any) -> int:
    return int(s.execute(select(func.count()).select_from(table)).scalar() or 0)


def _opened(hub: Hub, s: Session, pid: int | None) -> bytes:
    assert pid is not None
    payload = s.get(Payload, pid)
    assert payload is not None
    return hub.sealer.open(payload.sealed, str(pid).encode())


def test_several_jobs_in_one_transaction(hub: Hub) -> None:
    jobs = _jobs()
    with session(hub) as s:
        assert QueueWriter(hub).write_many(s, jobs) == [3, 2, 1]
        s.commit()
    with session(hub) as s:
        rows = _rows(s)
        mail = [r for r in rows if r.kind == "mail"]
        assert [(r.source_id, r.recipient, r.status, r.method) for r in mail] == [
            ("spool-a", "dr.kaya@clinic-a.example", "queued", "openpgp"),
            ("spool-a", "lab@clinic-a.example", "queued", "openpgp"),
            ("spool-a", "bookings@airline.example", "queued", "plaintext"),
            ("spool-b", "ana@patient.example", "held", ""),
            ("spool-b", "dr.x@clinic-b.example", "held", "openpgp"),
            ("spool-c", "dr.y@clinic-c.example", "queued", "smime")]
        a1, a2, a3, b1, b2, c1 = mail
        assert a1.require_tls and not a2.require_tls and a1.trace == '[{"rule": "partner"}]'
        assert (a1.message_id, a1.sender, a1.case_id) == ("<a@medvoyage.example>", SENDER, None)
        assert c1.case_id == "MT-2026-0001" and b1.reason == "no key for ana@patient.example"
        # recipients sharing one data object share one payload row; others have their own
        assert a1.payload_id == a2.payload_id and b1.payload_id == b2.payload_id
        assert len({a1.payload_id, a3.payload_id, b1.payload_id, c1.payload_id}) == 4
        for row, spec in ((a1, jobs[0].specs[0]), (a3, jobs[0].specs[2]),
                          (b1, jobs[1].specs[0]), (c1, jobs[2].specs[0])):
            assert _opened(hub, s, row.payload_id) == spec.data
        payload = s.get(Payload, a1.payload_id)
        assert payload is not None and jobs[0].specs[0].data not in payload.sealed
        with pytest.raises(CryptoError):  # bound to its row: another id does not open it
            hub.sealer.open(payload.sealed, str(a3.payload_id).encode())

        # a notice to the sender for each held copy: no content of the message in it
        notices = [r for r in rows if r.kind == "notice"]
        assert sorted((r.source_id, r.recipient, r.status, r.method) for r in notices) == [
            ("spool-b:held:ana@patient.example", SENDER, "queued", "plaintext"),
            ("spool-b:held:dr.x@clinic-b.example", SENDER, "queued", "plaintext")]
        for n, held in zip(notices, (b1, b2), strict=True):
            text = _opened(hub, s, n.payload_id)
            assert f"queue id {held.id}".encode() in text and b"the original of b" not in text
            assert f"mailhub queue release {held.id}".encode() in text and b"by itself" in text
            assert held.recipient.encode() in text
        assert _count(s, Payload) == 6  # 4 distinct data objects + 2 notices

        # one audit entry per row, naming it: queued / encrypted / held, then the notices
        by_queue = {e.detail_data()["queue_id"]: e for e in _audit(s)}
        assert set(by_queue) == {r.id for r in rows}
        want = {a1.id: "encrypted", a2.id: "encrypted", a3.id: "queued", b1.id: "held",
                b2.id: "held", c1.id: "encrypted"}
        for row in rows:
            e = by_queue[row.id]
            assert e.action == want.get(row.id, "queued")
            assert e.detail_data()["recipient"] == row.recipient
            assert e.detail_data()["method"] == row.method
            assert e.message_id == row.message_id and e.case_id == row.case_id
            assert e.actor == ("notices" if row.kind == "notice" else "outbound")
        assert by_queue[b2.id].detail_data()["reason"] == "openpgp encryption failed: expired key"
        assert [e.detail_data()["queue_id"] for e in _audit(s)][:6] == [r.id for r in mail]
        result = verify(s)
        assert result.ok and result.entries == 8, result.problem


def test_a_replay_writes_nothing_twice(hub: Hub) -> None:
    writer = QueueWriter(hub)
    with session(hub) as s:
        writer.write_many(s, _jobs())
        s.commit()
    with session(hub) as s:
        before = (_count(s, OutboundItem), _count(s, Payload), _count(s, AuditEntry))
        assert writer.write_many(s, _jobs()) == [0, 0, 0]
        assert writer.write_many(s, _jobs()[1:]) == [0, 0]
        s.commit()
    with session(hub) as s:
        assert (_count(s, OutboundItem), _count(s, Payload), _count(s, AuditEntry)) == before
        # a message replayed with one more recipient (only that one is new) next to a new one
        grown = _jobs()[0]
        extra = RowSpec("second@airline.example", "queued", "plaintext", "smarthost", b"x")
        grown = WriteJob(grown.source_id, grown.message_id, grown.sender, [*grown.specs, extra])
        fresh = WriteJob("spool-d", "<d@medvoyage.example>", "", [
            RowSpec("ana@patient.example", "held", "", "smarthost", b"d", reason="no key")])
        assert writer.write_many(s, [grown, fresh]) == [1, 1]
        s.commit()
    with session(hub) as s:
        rows = _rows(s)
        assert len(rows) == before[0] + 2
        assert [r.source_id for r in rows].count("spool-a") == 4
        # no sender (a bounce, a notice): a held copy gets no notice, nobody to tell
        assert not [r for r in rows if r.source_id.startswith("spool-d:")]
        assert verify(s).ok


def test_write_is_write_many_of_one(hub: Hub) -> None:
    job = _jobs()[1]
    with session(hub) as s:
        assert QueueWriter(hub).write(s, source_id=job.source_id, message_id=job.message_id,
                                      sender=job.sender, specs=job.specs, actor="release") == 2
        assert QueueWriter(hub).write(s, source_id=job.source_id, message_id=job.message_id,
                                      sender=job.sender, specs=job.specs) == 0
        s.commit()
        assert [(e.actor, e.action) for e in _audit(s)] == [
            ("release", "held"), ("release", "held"), ("notices", "queued"), ("notices", "queued")]


def test_sent_and_failed_outcomes_are_audited_per_row(hub: Hub) -> None:
    with session(hub) as s:
        QueueWriter(hub).write_many(s, _jobs())
        s.commit()
        rows = {(r.source_id, r.recipient): r for r in _rows(s)}
    a1 = rows[("spool-a", "dr.kaya@clinic-a.example")]
    a3 = rows[("spool-a", "bookings@airline.example")]
    c1 = rows[("spool-c", "dr.y@clinic-c.example")]
    notice = rows[("spool-b:held:ana@patient.example", SENDER)]
    with session(hub) as s:
        before = _count(s, AuditEntry)
        mark_sent_in(s, [c1.id or 0, a1.id or 0, notice.id or 0], "250 2.0.0 Ok: queued as X1")
        mark_failed_in(s, a3.id or 0, "550 5.1.1 <bookings@airline.example>: no such user")
        mark_sent_in(s, [], "250 ignored")
        s.commit()
    with session(hub) as s:
        new = _audit(s)[before:]
        assert [(e.actor, e.action, e.detail_data()["queue_id"]) for e in new] == [
            ("delivery", "sent", a1.id), ("delivery", "sent", c1.id),
            ("delivery", "sent", notice.id), ("delivery", "failed", a3.id)]
        sent_a1, sent_c1, sent_notice, failed = new
        assert sent_a1.detail_data() == {
            "recipient": "dr.kaya@clinic-a.example", "queue_id": a1.id, "relay": "smarthost",
            "kind": "mail", "reply": "250 2.0.0 Ok: queued as X1"}
        assert (sent_a1.message_id, sent_a1.case_id) == ("<a@medvoyage.example>", None)
        assert (sent_c1.message_id, sent_c1.case_id) == ("<c@medvoyage.example>", "MT-2026-0001")
        assert sent_notice.detail_data()["kind"] == "notice"
        assert sent_notice.detail_data()["recipient"] == SENDER
        assert failed.detail_data()["recipient"] == "bookings@airline.example"
        assert failed.detail_data()["reply"].startswith("550 5.1.1")
        statuses = {r.id: r.status for r in _rows(s)}
        assert [statuses[i] for i in (a1.id, c1.id, notice.id, a3.id)] == [
            "sent", "sent", "sent", "failed"]
        result = verify(s)
        assert result.ok, result.problem


def test_rows_sent_with_different_replies_keep_each_its_own(hub: Hub) -> None:
    """A real next hop names its own queue id in each reply: one statement marks them all,
    and each row and audit entry keeps the reply it got."""
    with session(hub) as s:
        QueueWriter(hub).write_many(s, _jobs()[:1])
        s.commit()
        ids = sorted(r.id or 0 for r in _rows(s))
    with session(hub) as s:
        before = _count(s, AuditEntry)
        mark_sent_many(s, [(i, f"250 2.0.0 Ok: queued as Q{i}") for i in ids])
        s.commit()
    with session(hub) as s:
        assert {r.id: (r.status, r.reason) for r in _rows(s)} == {
            i: ("sent", f"250 2.0.0 Ok: queued as Q{i}") for i in ids}
        new = _audit(s)[before:]
        assert [(e.detail_data()["queue_id"], e.detail_data()["reply"]) for e in new] == [
            (i, f"250 2.0.0 Ok: queued as Q{i}") for i in ids]
        assert verify(s).ok


def test_a_reply_that_looks_like_key_material_still_records_the_outcome(hub: Hub) -> None:
    with session(hub) as s:
        QueueWriter(hub).write_many(s, _jobs()[:1])
        s.commit()
        ids = [r.id or 0 for r in _rows(s)]
    with session(hub) as s:
        mark_sent_in(s, ids, "250 2.0.0 queued -----BEGIN PGP MESSAGE----- as 4Fk2")
        s.commit()
    with session(hub) as s:
        assert {r.status for r in _rows(s)} == {"sent"}


def test_queued_rows_are_remembered_for_the_senders_held_ones_are_not(hub: Hub) -> None:
    writer = QueueWriter(hub)
    writer.fresh = FreshPayloads()
    with session(hub) as s:
        writer.write_many(s, _jobs())
        assert len(writer.fresh) == 0  # nothing before the commit
        hooks = s.info.pop(AFTER_COMMIT)
        s.commit()
        rows = _rows(s)
        for hook in hooks:  # what GroupCommit does once the commit is through
            hook()
        # a's 3 copies, c's one and the 2 notices about b's held copies (b's own rows: not)
        assert len(writer.fresh) == 6
        for row in rows:
            got = writer.fresh.take(row.id, row.payload_id or 0)
            if row.status == "held":
                assert got is None
            else:  # exactly the bytes stored under that row's payload id
                assert got == _opened(hub, s, row.payload_id)
        assert len(writer.fresh) == 0
