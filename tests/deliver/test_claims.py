"""Claims of queue rows, on SQLite and on PostgreSQL: a stale claim is taken over, but never
one the claiming process still holds, and a live sender's renewed claims do not look stale."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.engine import Engine
from sqlmodel import Session

from mailhub.deliver import queue
from mailhub.store.models import OutboundItem, utcnow


def _queue_rows(engine: Engine, n: int) -> list[int]:
    with Session(engine) as s:
        ids = queue.insert_items(s, [
            queue.item_row(source_id=f"spool-{i}", recipient=f"r{i}@clinic.example",
                           message_id=f"<m{i}@x.example>", sender="coord@medvoyage.example")
            for i in range(n)])
        s.commit()
    return ids


def _claim(engine: Engine, now: object, held: set[int] = frozenset()) -> list[int]:  # type: ignore[assignment]
    with Session(engine) as s:
        got = queue.claim_due_in(s, 10, now, timedelta(minutes=10), held=held)  # type: ignore[arg-type]
        s.commit()
    return sorted(c.id for c in got)


def test_a_stale_claim_is_taken_over_unless_its_holder_still_sends_it(engine: Engine) -> None:
    ids = _queue_rows(engine, 3)
    start = utcnow()
    assert _claim(engine, start) == sorted(ids)
    assert _claim(engine, start + timedelta(minutes=5)) == []  # fresh claims are left alone
    later = start + timedelta(minutes=11)
    assert _claim(engine, later, held={ids[0], ids[2]}) == [ids[1]]  # its sender died
    with Session(engine) as s:
        assert s.get(OutboundItem, ids[1]).attempts == 2  # type: ignore[union-attr]


def test_renewed_claims_do_not_look_stale(engine: Engine) -> None:
    ids = _queue_rows(engine, 3)
    start = utcnow()
    assert _claim(engine, start) == sorted(ids)
    with Session(engine) as s:
        sent = s.get(OutboundItem, ids[2])
        assert sent is not None
        sent.status, sent.sending_since = "sent", None  # as mark_sent leaves it
        s.add(sent)
        s.flush()
        queue.renew_claims_in(s, {ids[0], ids[2]}, start + timedelta(minutes=8))
        s.commit()
    # eleven minutes after the claim, three after the renewal: only the unrenewed row is stale
    assert _claim(engine, start + timedelta(minutes=11)) == [ids[1]]
    with Session(engine) as s:
        sent = s.get(OutboundItem, ids[2])
        assert sent is not None and (sent.status, sent.sending_since) == ("sent", None)


def test_at_start_only_claims_of_dead_or_stale_senders_are_taken_back(engine: Engine) -> None:
    """Several instances share one PostgreSQL: a starting hub takes back the rows of a dead
    process of its own host, and stale claims, but not what a live instance is sending."""
    ids = _queue_rows(engine, 5)
    now = utcnow()
    owners = {ids[0]: "box:101:aa", ids[1]: "box:102:bb", ids[2]: "other-box:103:cc", ids[3]: ""}
    with Session(engine) as s:
        for item_id, owner in owners.items():
            row = s.get(OutboundItem, item_id)
            assert row is not None
            row.sending_since, row.claimed_by = now, owner
            s.add(row)
        old = s.get(OutboundItem, ids[4])
        assert old is not None
        old.sending_since, old.claimed_by = now - timedelta(minutes=11), "other-box:104:dd"
        s.add(old)
        s.commit()
    back = queue.recover_inflight(engine, host="box", alive=lambda pid: pid == 102)
    # 101 is gone; 102 still runs here; other-box may be sending; no owner: from before owners
    # were recorded; a claim eleven minutes old: its sender died
    assert sorted(r.id for r in back) == sorted([ids[0], ids[3], ids[4]])
    with Session(engine) as s:
        left = {i: s.get(OutboundItem, i) for i in ids}
        assert [left[i].sending_since is not None for i in ids] == [  # type: ignore[union-attr]
            False, True, True, False, False]
        assert left[ids[2]].claimed_by == "other-box:103:cc"  # type: ignore[union-attr]


def test_a_claim_names_its_owner(engine: Engine) -> None:
    ids = _queue_rows(engine, 1)
    with Session(engine) as s:
        queue.claim_due_in(s, 10, owner="box:7:ee")
        s.commit()
        row = s.get(OutboundItem, ids[0])
        assert row is not None and row.claimed_by == "box:7:ee" and row.sending_since is not None
