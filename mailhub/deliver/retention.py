"""Finished mail lets go of its bytes: a sweep of the queue's payloads, off the hot path.

A row that ended (``sent``, or ``failed`` with its DSN already on its way) keeps its line for
``mailhub queue list``, but the exact bytes it carried serve nobody once
``[delivery].keep_sent_payloads`` seconds have passed: the case file keeps its own sealed copy.
Without this sweep the queue database grew by every message sent (about 270 KB for a 200 KiB
OpenPGP message). Deleting each payload as its row ended cost the hot path about 0.1 ms a
message; the sweep instead walks the finished rows in (updated_at, id) order from where it
stopped, a bounded chunk at a time, so each row is looked at about once whatever the history.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, bindparam, delete, exists, or_, select, update
from sqlmodel import Session

from mailhub.deliver.queue import GroupCommit
from mailhub.store.models import OutboundItem, Payload, utcnow

log = logging.getLogger("mailhub.queue")

FINISHED = ("sent", "failed")
_T = OutboundItem.__table__  # type: ignore[attr-defined]
_P = Payload.__table__  # type: ignore[attr-defined]
_START = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Position:
    """Where the walk over one status's finished rows stopped: (updated_at, id) seen last."""

    at: datetime = _START
    id: int = 0


@dataclass(frozen=True)
class Chunk:
    """One step of the sweep: rows looked at, payloads deleted, and where to go on from."""

    status: str
    rows: int
    deleted: int
    position: Position


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


def sweep_chunk(session: Session, status: str, position: Position, before: datetime,
                limit: int) -> Chunk:
    """Release the payloads of up to ``limit`` rows of ``status`` that ended before ``before``,
    after ``position``. The caller keeps the returned position once this has committed."""
    after = or_(_T.c.updated_at > position.at,
                and_(_T.c.updated_at == position.at, _T.c.id > position.id))
    rows = session.execute(
        select(_T.c.id, _T.c.payload_id, _T.c.updated_at)
        .where(_T.c.status == status, after, _T.c.updated_at < before)
        .order_by(_T.c.updated_at, _T.c.id).limit(limit)).all()
    if not rows:
        return Chunk(status, 0, 0, position)
    holding = [(int(r.id), int(r.payload_id)) for r in rows if r.payload_id]
    if holding:
        session.execute(update(_T).where(_T.c.id.in_(bindparam("ids", expanding=True)))
                        .values(payload_id=None), {"ids": [i for i, _ in holding]})
    deleted = drop_unreferenced(session, (p for _, p in holding))
    last = rows[-1]
    return Chunk(status, len(rows), deleted, Position(last.updated_at, int(last.id)))


class PayloadSweeper:
    """Walks each finished status from where it stopped; one instance per serving process."""

    def __init__(self, keep_seconds: int, *, limit: int = 500) -> None:
        self.keep_seconds = keep_seconds
        self.limit = limit
        self.positions = {status: Position() for status in FINISHED}
        self.deleted = 0

    async def sweep(self, commits: GroupCommit, now: datetime | None = None) -> int:
        """Every finished row old enough, chunk by chunk through the database writer (each
        chunk shares a commit with the hot path's work and holds it up only briefly)."""
        before = cutoff(now or utcnow(), self.keep_seconds)
        deleted = 0
        for status in FINISHED:
            while True:
                position = self.positions[status]
                chunk = await commits.run(
                    lambda s, st=status, p=position: sweep_chunk(s, st, p, before, self.limit))
                self.positions[status] = chunk.position
                deleted += chunk.deleted
                if chunk.rows < self.limit:
                    break
        self.deleted += deleted
        return deleted

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
