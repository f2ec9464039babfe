"""``audit.append_many``: a batch of entries chained in order with two statements, on SQLite and
a real PostgreSQL.

The relay's hot path audits a whole batch of messages at once, so the batch must chain exactly
as the same entries appended one by one would: in the given order, continuing the chain left by
single appends, and refusing a bad entry before anything of the batch is written (a half-written
batch would record decisions that were never taken). Savepoints must not break the chain.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from sqlmodel import Session, create_engine

from mailhub.store.audit import (
    AUDIT_TABLES,
    GENESIS,
    AuditEntry,
    AuditError,
    AuditHead,
    Pending,
    append,
    append_many,
    entry_hash,
    iter_entries,
    verify,
)
from tests.pgserver import throwaway_engine


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    with throwaway_engine(request.param, request.config, tmp_path / "audit.db", create_engine,
                          list(AUDIT_TABLES)) as eng:
        yield eng


def _batch(n: int, action: str = "queued", start: int = 0) -> list[Pending]:
    return [Pending("outbound", action, message_id=f"<m{start + i}@x.example>",
                    case_id="MT-2026-0001" if i % 2 else None,
                    detail={"recipient": f"r{start + i}@clinic.example", "queue_id": start + i})
            for i in range(n)]


def _entries(engine: Engine) -> list[AuditEntry]:
    with Session(engine) as s:
        return list(iter_entries(s))


def _verified(engine: Engine, count: int) -> None:
    with Session(engine) as s:
        result = verify(s)
    assert result.ok, result.problem
    assert result.entries == count


def test_batches_and_single_appends_make_one_chain_in_batch_order(engine: Engine) -> None:
    with Session(engine) as s:
        append(s, "smtp-inbound", "accepted", message_id="<first@x.example>")
        rows = append_many(s, _batch(5))
        single = append(s, "delivery", "sent", message_id="<m0@x.example>")
        s.commit()
    assert [r["seq"] for r in rows] == [2, 3, 4, 5, 6]
    assert single.seq == 7
    with Session(engine) as s:  # a later transaction continues where the head is
        more = append_many(s, _batch(3, "encrypted", start=5))
        s.commit()
    assert [r["seq"] for r in more] == [8, 9, 10]
    entries = _entries(engine)
    assert [e.message_id for e in entries] == [
        "<first@x.example>", *(f"<m{i}@x.example>" for i in range(5)), "<m0@x.example>",
        *(f"<m{i}@x.example>" for i in range(5, 8))]
    assert [e.action for e in entries] == ["accepted", *["queued"] * 5, "sent", *["encrypted"] * 3]
    assert [e.detail_data().get("queue_id") for e in entries[1:6]] == [0, 1, 2, 3, 4]
    prev = GENESIS
    for e in entries:  # each entry chains to the one before it, batch or not
        assert e.prev_hash == prev and e.hash == entry_hash(e)
        prev = e.hash
    assert [r["hash"] for r in rows] == [e.hash for e in entries[1:6]]
    _verified(engine, 10)
    with Session(engine) as s:
        head = s.get(AuditHead, 1)
        assert head is not None and (head.seq, head.hash) == (10, prev)


def test_a_changed_batch_entry_is_caught(engine: Engine) -> None:
    with Session(engine) as s:
        append_many(s, _batch(4))
        s.commit()
    with Session(engine) as s:
        victim = s.get(AuditEntry, 3)
        assert victim is not None
        victim.detail = victim.detail.replace("r2@", "someone-else@")
        s.add(victim)
        s.commit()
    with Session(engine) as s:
        result = verify(s)
    assert not result.ok and result.first_bad_seq == 3


_BAD = [
    Pending("outbound", "Queued!"),  # not a lower-case word
    Pending("outbound", ""),
    Pending("   ", "queued"),  # no actor
    Pending("", "queued"),
    Pending("outbound", "queued", detail={"recipient": "r@x.example", "body": "Hb 13.2"}),
    Pending("outbound", "queued", detail={"nested": [{"Private-Key": "x"}]}),
    Pending("outbound", "queued", detail={"note": "-----BEGIN PGP PUBLIC KEY BLOCK-----"}),
    Pending("outbound", "queued", detail={"when": object()}),  # not JSON data
]


# each bad entry at the start, in the middle or at the end of the batch (by turns)
@pytest.mark.parametrize(("bad", "where"), [(b, (0, 2, 4)[i % 3]) for i, b in enumerate(_BAD)])
def test_a_bad_entry_anywhere_writes_nothing_of_the_batch(engine: Engine, bad: Pending,
                                                          where: int) -> None:
    with Session(engine) as s:
        append(s, "x", "accepted")
        s.commit()
    batch = _batch(4)
    batch.insert(where, bad)
    with Session(engine) as s:
        append(s, "x", "filed")  # the transaction already holds the chain head
        with pytest.raises(AuditError):
            append_many(s, batch)
        after = append(s, "x", "sent")  # the chain goes on right after the last good entry
        s.commit()
    assert after.seq == 3
    entries = _entries(engine)
    assert [e.action for e in entries] == ["accepted", "filed", "sent"]
    assert not any((e.message_id or "").startswith("<m") for e in entries)
    _verified(engine, 3)


def test_a_refused_batch_in_a_fresh_transaction_leaves_the_log_as_it_was(engine: Engine) -> None:
    with Session(engine) as s:
        append_many(s, _batch(2))
        s.commit()
    with Session(engine) as s:
        with pytest.raises(AuditError):
            append_many(s, [*_batch(3, start=2), Pending("outbound", "queued",
                                                         detail={"password": "x"})])
        s.commit()  # the caller commits its other work: none of the batch goes with it
    _verified(engine, 2)
    with Session(engine) as s:
        assert s.execute(select(func.count()).select_from(AuditEntry)).scalar() == 2


def test_an_empty_batch_writes_nothing(engine: Engine) -> None:
    with Session(engine) as s:
        assert append_many(s, []) == []
        s.commit()
    with Session(engine) as s:
        assert s.get(AuditHead, 1) is None  # not even the head row
    _verified(engine, 0)
    with Session(engine) as s:
        append_many(s, _batch(2))
        assert append_many(s, []) == []
        s.commit()
    with Session(engine) as s:
        head = s.get(AuditHead, 1)
        assert head is not None and head.seq == 2
    _verified(engine, 2)


def test_a_rolled_back_savepoint_batch_is_not_chained_to(engine: Engine) -> None:
    with Session(engine) as s:
        append_many(s, _batch(2))
        try:
            with s.begin_nested():
                append_many(s, _batch(3, "held", start=2))
                raise RuntimeError("undo the savepoint")
        except RuntimeError:
            pass
        rows = append_many(s, _batch(2, "encrypted", start=5))
        s.commit()
    assert [r["seq"] for r in rows] == [3, 4]
    entries = _entries(engine)
    assert [e.action for e in entries] == ["queued", "queued", "encrypted", "encrypted"]
    _verified(engine, 4)


def test_a_released_savepoint_batch_stays_and_a_rolled_back_one_goes(engine: Engine) -> None:
    with Session(engine) as s:
        with s.begin_nested():
            append_many(s, _batch(2))  # the first entries of all, inside a savepoint
        try:
            with s.begin_nested():
                append(s, "x", "filed")
                append_many(s, _batch(2, "held", start=2))
                raise RuntimeError("undo")
        except RuntimeError:
            pass
        with s.begin_nested():
            append_many(s, _batch(1, "sent", start=4))
        last = append(s, "x", "filed")
        s.commit()
    assert last.seq == 4
    assert [e.action for e in _entries(engine)] == ["queued", "queued", "sent", "filed"]
    _verified(engine, 4)


def test_a_refused_batch_inside_a_savepoint_then_rollback(engine: Engine) -> None:
    with Session(engine) as s:
        append(s, "x", "accepted")
        nested = s.begin_nested()
        append_many(s, _batch(2))
        with pytest.raises(AuditError):
            append_many(s, [Pending("x", "bad action")])
        nested.rollback()
        append_many(s, _batch(1, "sent", start=9))
        s.commit()
    assert [e.action for e in _entries(engine)] == ["accepted", "sent"]
    _verified(engine, 2)
