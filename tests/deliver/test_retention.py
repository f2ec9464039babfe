"""The payload sweep, on SQLite and PostgreSQL: finished rows old enough give up their payloads
(a payload shared with a row still waiting stays), nothing else is touched, and chunk after chunk
every such row is found: through many rows that ended at the same instant, after a restart,
and when a row ends with an earlier timestamp than rows already swept."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from mailhub.crypto.atrest import AtRest
from mailhub.deliver import payloads, queue
from mailhub.deliver.retention import (
    OLDEST_UNSWEPT,
    PayloadSweeper,
    cutoff,
    drop_unreferenced,
    sweep_chunk,
)
from mailhub.store.db import make_engine, migrate
from mailhub.store.models import OutboundItem, Payload

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
SEALER = AtRest(os.urandom(32))


def add(engine: Engine, status: str, ended: datetime, *, payload: int | None = None,
        n: int = 0) -> tuple[int, int]:
    """A queue row of ``status`` last changed at ``ended``; (row id, payload id)."""
    with Session(engine) as s:
        pid = payload or payloads.insert_payload(s, f"body {n}".encode(), SEALER)
        rid = queue.insert_item(s, source_id=f"spool-{n}", recipient=f"r{n}@clinic.example",
                                status=status, payload_id=pid, updated_at=ended)
        s.commit()
    return rid, pid


def payload_of(engine: Engine, row_id: int) -> int | None:
    with Session(engine) as s:
        row = s.get(OutboundItem, row_id)
        assert row is not None
        return row.payload_id


def payload_ids(engine: Engine) -> set[int]:
    with Session(engine) as s:
        return {int(p) for p in s.execute(select(Payload.id)).scalars()}  # type: ignore[call-overload]


def test_cutoff_is_now_minus_the_keep_time() -> None:
    assert cutoff(NOW, 3600) == NOW - timedelta(hours=1)
    assert cutoff(NOW, 0) == NOW
    assert cutoff(NOW, -5) == NOW  # never in the future


def test_finished_rows_old_enough_give_up_their_payloads(engine: Engine) -> None:
    old, recent = NOW - timedelta(days=2), NOW - timedelta(minutes=5)
    sent_old = add(engine, "sent", old, n=1)
    failed_old = add(engine, "failed", old, n=2)
    sent_recent = add(engine, "sent", recent, n=3)
    queued = add(engine, "queued", old, n=4)
    held = add(engine, "held", old, n=5)
    # two recipients of one message share a payload: one sent long ago, one still queued
    shared_sent = add(engine, "sent", old, n=6)
    shared_queued = add(engine, "queued", old, payload=shared_sent[1], n=7)

    deleted = asyncio.run(sweep(engine, PayloadSweeper(86400)))

    assert deleted == 2
    for row, _ in (sent_old, failed_old, shared_sent):
        assert payload_of(engine, row) is None
    left = payload_ids(engine)
    assert sent_old[1] not in left and failed_old[1] not in left
    for row, pid in (sent_recent, queued, held, shared_queued):
        assert payload_of(engine, row) == pid and pid in left
    # the shared payload still opens for the row that waits for it
    with Session(engine) as s:
        sealed = payloads.sealed_payloads_in(s, [shared_sent[1]])[shared_sent[1]]
    assert SEALER.open(sealed, str(shared_sent[1]).encode()) == b"body 6"


def test_the_last_sharer_takes_the_payload_with_it(engine: Engine) -> None:
    first = add(engine, "sent", NOW - timedelta(days=3), n=1)
    second = add(engine, "queued", NOW - timedelta(days=3), payload=first[1], n=2)
    sweeper = PayloadSweeper(3600)
    assert asyncio.run(sweep(engine, sweeper)) == 0
    with Session(engine) as s:  # the second recipient's delivery ends later
        row = s.get(OutboundItem, second[0])
        assert row is not None
        row.status, row.updated_at = "sent", NOW - timedelta(hours=2)
        s.add(row)
        s.commit()
    assert asyncio.run(sweep(engine, sweeper)) == 1
    assert first[1] not in payload_ids(engine)


def test_chunks_go_through_ties_and_stop_when_nothing_is_left(engine: Engine) -> None:
    # seven rows that ended at the same instant, three at a time: all are swept, and then the
    # next chunk finds nothing (swept rows no longer hold a payload, so they are not seen)
    same = NOW - timedelta(days=1)
    rows = [add(engine, "sent", same, n=i) for i in range(7)]
    seen = []
    for _ in range(10):
        with Session(engine) as s:
            chunk = sweep_chunk(s, "sent", cutoff(NOW, 60), 3)
            s.commit()
        seen.append(chunk.rows)
        if chunk.rows < 3:
            break
    assert seen == [3, 3, 1]
    assert all(payload_of(engine, r) is None for r, _ in rows)
    assert payload_ids(engine) == set()
    with Session(engine) as s:
        assert sweep_chunk(s, "sent", cutoff(NOW, 60), 3).rows == 0


def test_a_row_stamped_earlier_than_swept_ones_is_still_swept(engine: Engine) -> None:
    # another instance's clock runs behind: its row ends "before" rows already swept
    sweeper = PayloadSweeper(60)
    swept = add(engine, "sent", NOW - timedelta(hours=1), n=1)
    asyncio.run(sweep(engine, sweeper))
    assert payload_of(engine, swept[0]) is None
    behind = add(engine, "sent", NOW - timedelta(hours=2), n=2)
    assert asyncio.run(sweep(engine, sweeper)) == 1
    assert payload_of(engine, behind[0]) is None


def test_a_new_sweeper_after_a_restart_looks_only_at_what_is_left(engine: Engine) -> None:
    old = NOW - timedelta(days=1)
    for i in range(5):
        add(engine, "sent", old, n=i)
    assert asyncio.run(sweep(engine, PayloadSweeper(60, limit=2))) == 5
    left = add(engine, "failed", old, n=9)
    restarted = PayloadSweeper(60, limit=2)
    with Session(engine) as s:  # the rows swept before are not in the way of the first chunk
        chunk = sweep_chunk(s, "sent", cutoff(NOW, 60), 2)
        assert chunk.rows == 0
    assert asyncio.run(sweep(engine, restarted)) == 1
    assert payload_of(engine, left[0]) is None and payload_ids(engine) == set()


def test_rows_that_end_later_are_found_by_a_later_sweep(engine: Engine) -> None:
    sweeper = PayloadSweeper(0)
    first = add(engine, "sent", NOW - timedelta(hours=1), n=1)
    asyncio.run(sweep(engine, sweeper))
    later = add(engine, "failed", NOW - timedelta(minutes=1), n=2)
    assert asyncio.run(sweep(engine, sweeper)) == 1
    assert payload_of(engine, first[0]) is None and payload_of(engine, later[0]) is None
    with Session(engine) as s:
        assert s.execute(select(func.count()).select_from(Payload)).scalar() == 0


def test_drop_unreferenced_keeps_what_a_row_names(engine: Engine) -> None:
    kept = add(engine, "held", NOW, n=1)
    with Session(engine) as s:
        loose = payloads.insert_payload(s, b"orphan", SEALER)
        assert drop_unreferenced(s, [kept[1], loose, 0]) == 1
        s.commit()
    assert payload_ids(engine) == {kept[1]}


async def sweep(engine: Engine, sweeper: PayloadSweeper) -> int:
    commits = queue.GroupCommit(engine)
    try:
        return await sweeper.sweep(commits, now=NOW)
    finally:
        commits.close()


def test_sqlite_finds_the_oldest_unswept_rows_through_the_partial_index(tmp_path: Path) -> None:
    """With the migrated schema the sweep's query reads ``ix_outbound_unswept`` (rows that still
    hold a payload), not every finished row of the history."""
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.sqlite'}")
    try:
        migrate(engine)
        compiled = OLDEST_UNSWEPT.compile(dialect=engine.dialect)
        with engine.connect() as conn:
            plan = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + str(compiled),
                                        ("sent", "2026-11-23 12:00:00.000000", 500, 0)).all()
        assert any("ix_outbound_unswept" in str(step[-1]) for step in plan), plan
    finally:
        engine.dispose()
