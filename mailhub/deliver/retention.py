"""Finished mail lets go of its bytes: a sweep of the queue's payloads, off the hot path.

A row that ended (``sent``, or ``failed`` with its DSN already on its way) keeps its line for
``mailhub queue list``, but the exact bytes it carried serve nobody once
``[delivery].keep_sent_payloads`` seconds have passed: the case file keeps its own sealed copy.
Without this sweep the queue database grew by every message sent (about 270 KB for a 200 KiB
OpenPGP message). Deleting each payload as its row ended cost the hot path about 0.1 ms a
message; the sweep instead takes the oldest finished rows that still hold a payload, a bounded
chunk at a time, through a partial index (``ix_outbound_unswept``) that holds only such rows:
a swept row leaves it, so the sweep keeps no position, a restart does not walk the history again,
and a row that ended with an earlier timestamp than others already swept is still found.

With SQLite, large payloads lie in segment files (``payload_files``): after the chunks, a
segment no row names any more is deleted, once that state has committed. A segment still named
``COMPACT_GRACE`` after every finished message in it should have been swept (a row retried
for days keeps it) has its remaining payloads moved into their rows, and then goes too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, delete, exists, select, update
from sqlmodel import Session

from mailhub.deliver import payload_files
from mailhub.deliver.fresh import AFTER_COMMIT
from mailhub.deliver.payload_files import PayloadFiles
from mailhub.deliver.queue import GroupCommit
from mailhub.store.models import OutboundItem, Payload, utcnow

log = logging.getLogger("mailhub.queue")

FINISHED = ("sent", "failed")
COMPACT_GRACE = 3600  # seconds past keep_sent_payloads before a still-named segment is compacted
COMPACT_BATCH = 50  # payloads moved into their rows a transaction (up to 50 x 270 KB)
_T = OutboundItem.__table__  # type: ignore[attr-defined]
_P = Payload.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Chunk:
    """One step of the sweep: rows that let go of their payload, payloads deleted."""

    status: str
    rows: int
    deleted: int


def cutoff(now: datetime, keep_seconds: int) -> datetime:
    """Rows that ended before this instant give up their payloads."""
    return now - timedelta(seconds=max(0, keep_seconds))


def drop_unreferenced(session: Session, payload_ids: Iterable[int]) -> int:
    """Delete those of ``payload_ids`` that no queue row names any more (recipients of one
    message share a payload: it goes with the last of them)."""
    ids = sorted({int(p) for p in payload_ids if p})
    if not ids:
        return 0
    named = exists().where(_T.c.payload_id == _P.c.id)
    result = session.execute(delete(_P).where(_P.c.id.in_(ids)).where(~named))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


# ``payload_id IS NOT NULL`` written out: it is what lets the planner use the partial index
OLDEST_UNSWEPT = (
    select(_T.c.id, _T.c.payload_id)
    .where(_T.c.status == bindparam("status"), _T.c.payload_id.is_not(None),
           _T.c.updated_at < bindparam("before"))
    .order_by(_T.c.updated_at, _T.c.id).limit(bindparam("limit")))


def sweep_chunk(session: Session, status: str, before: datetime, limit: int) -> Chunk:
    """Release the payloads of the (at most ``limit``) oldest rows of ``status`` that ended
    before ``before`` and still hold one. Unhooked, they leave ``ix_outbound_unswept``: the
    next chunk finds the next rows, whatever happened in between."""
    rows = session.execute(OLDEST_UNSWEPT, {"status": status, "before": before,
                                            "limit": limit}).all()
    if not rows:
        return Chunk(status, 0, 0)
    session.execute(update(_T).where(_T.c.id.in_(bindparam("ids", expanding=True)))
                    .values(payload_id=None), {"ids": [int(r.id) for r in rows]})
    deleted = drop_unreferenced(session, (int(r.payload_id) for r in rows))
    return Chunk(status, len(rows), deleted)


class PayloadSweeper:
    """Sweeps each finished status chunk by chunk; one instance per serving process (several
    instances on one database may sweep at once: a row is unhooked once, a payload deleted
    once no row names it)."""

    def __init__(self, keep_seconds: int, *, limit: int = 500,
                 files: PayloadFiles | None = None) -> None:
        self.keep_seconds = keep_seconds
        self.limit = limit
        self.files = files
        self.deleted = 0
        self.segments_removed = 0

    async def sweep(self, commits: GroupCommit, now: datetime | None = None) -> int:
        """Every finished row old enough, chunk by chunk through the database writer (each
        chunk shares a commit with the hot path's work and holds it up only briefly)."""
        before = cutoff(now or utcnow(), self.keep_seconds)
        deleted = 0
        for status in FINISHED:
            while True:
                chunk = await commits.run(
                    lambda s, st=status: sweep_chunk(s, st, before, self.limit))
                deleted += chunk.deleted
                if chunk.rows < self.limit:
                    break
        self.deleted += deleted
        if self.files is not None:
            await self.release_segments(commits, now)
        return deleted

    async def release_segments(self, commits: GroupCommit, now: datetime | None = None) -> int:
        """Delete the segment files no row names, after compacting old ones still named."""
        files = self.files
        assert files is not None
        old = cutoff(now or utcnow(), self.keep_seconds + COMPACT_GRACE)
        old_us = int(old.timestamp() * 1_000_000)

        def step(session: Session) -> tuple[int, int]:
            moved = payload_files.compact(session, files, old_us, COMPACT_BATCH)
            if moved:
                log.info("moved %d payload(s) out of segment files older than %s", moved, old)
            dead = payload_files.dead_segments(session, files)
            hooks = session.info.setdefault(AFTER_COMMIT, [])
            # only once the rows that named them are gone for good
            hooks.append(lambda: [files.remove(seg) for seg in dead])
            return moved, len(dead)

        total = 0
        while True:  # more steps only while compaction has more to move
            moved, removed = await commits.run(step)
            total += removed
            if moved < COMPACT_BATCH:
                break
        self.segments_removed += total
        return total

    async def run(self, commits: GroupCommit, stop: asyncio.Event, interval: float = 60) -> None:
        """Sweep at start and then every ``interval`` seconds until ``stop``."""
        while not stop.is_set():
            try:
                n = await self.sweep(commits)
                if n:
                    log.info("deleted %d payload(s) of mail finished over %ds ago", n,
                             self.keep_seconds)
            except Exception:
                log.exception("payload sweep failed; trying again later")
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval)
            except TimeoutError:
                pass
