"""The outbound queue in the database: one row per recipient, payloads sealed, claims atomic.

All functions are blocking (database work): the async edges call them through a thread.
A row is claimed by setting ``sending_since`` in the same transaction that selects it
(``FOR UPDATE SKIP LOCKED`` on PostgreSQL, the single writer lock on SQLite), so two hub
instances never send the same row at once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from mailhub.errors import NotFound
from mailhub.store.models import OutboundItem, Payload, utcnow

log = logging.getLogger("mailhub.queue")

STATUSES = ("queued", "held", "sent", "failed")


@dataclass(frozen=True)
class Claimed:
    id: int
    source_id: str
    message_id: str
    sender: str
    recipient: str
    relay: str
    kind: str
    require_tls: bool
    attempts: int
    created_at: datetime
    payload_id: int


def add_payload(session: Session, sealed: bytes) -> int:
    payload = Payload(sealed=sealed)
    session.add(payload)
    session.flush()
    assert payload.id is not None
    return payload.id


def existing_recipients(session: Session, source_id: str) -> set[str]:
    rows = session.exec(select(OutboundItem.recipient).where(OutboundItem.source_id == source_id))
    return set(rows)


def claim_due(engine: Engine, limit: int, now: datetime | None = None,
              stale_after: timedelta = timedelta(minutes=10)) -> list[Claimed]:
    """Claim up to ``limit`` due rows for sending (one transaction)."""
    now = now or utcnow()
    with Session(engine) as session:
        query = (
            select(OutboundItem)
            .where(OutboundItem.status == "queued", OutboundItem.next_attempt_at <= now)
            .where(or_(OutboundItem.sending_since.is_(None),  # type: ignore[union-attr]
                       OutboundItem.sending_since < now - stale_after))
            .order_by(OutboundItem.next_attempt_at, OutboundItem.id)
            .limit(limit)
        )
        if engine.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        rows = list(session.exec(query))
        claimed = []
        for row in rows:
            row.sending_since = now
            row.attempts += 1
            session.add(row)
            claimed.append(Claimed(row.id, row.source_id, row.message_id, row.sender,  # type: ignore[arg-type]
                                   row.recipient, row.relay, row.kind, row.require_tls,
                                   row.attempts, row.created_at, row.payload_id or 0))
        session.commit()
        return claimed


def load_payloads(engine: Engine, ids: Iterable[int]) -> dict[int, bytes]:
    ids = sorted(set(ids))
    if not ids:
        return {}
    with Session(engine) as session:
        rows = session.exec(select(Payload).where(Payload.id.in_(ids)))  # type: ignore[union-attr]
        return {p.id: p.sealed for p in rows}  # type: ignore[misc]


def mark_sent(engine: Engine, ids: list[int], reply: str = "") -> None:
    if not ids:
        return
    now = utcnow()
    with Session(engine) as session:
        session.execute(
            update(OutboundItem).where(OutboundItem.id.in_(ids))  # type: ignore[union-attr]
            .values(status="sent", sending_since=None, updated_at=now, reason=reply[:500])
        )
        session.commit()


def mark_retry(engine: Engine, item_id: int, reason: str, next_at: datetime) -> None:
    with Session(engine) as session:
        session.execute(
            update(OutboundItem).where(OutboundItem.id == item_id)
            .values(sending_since=None, next_attempt_at=next_at, reason=reason[:500],
                    updated_at=utcnow())
        )
        session.commit()


def mark_failed(engine: Engine, item_id: int, reason: str) -> None:
    with Session(engine) as session:
        session.execute(
            update(OutboundItem).where(OutboundItem.id == item_id)
            .values(status="failed", sending_since=None, reason=reason[:500], updated_at=utcnow())
        )
        session.commit()


def recover_inflight(engine: Engine) -> list[OutboundItem]:
    """After a crash: rows that were being sent are queued again at once (and reported)."""
    with Session(engine) as session:
        rows = list(session.exec(select(OutboundItem).where(
            and_(OutboundItem.status == "queued",
                 OutboundItem.sending_since.is_not(None)))))  # type: ignore[union-attr]
        for row in rows:
            log.warning("delivery of queue id %s (%s) was in flight at a crash; sending again",
                        row.id, row.message_id)
            row.sending_since = None
            row.next_attempt_at = utcnow()
            session.add(row)
        session.commit()
        return rows


def retry_all_now(engine: Engine) -> int:
    """On start, queued messages are retried at once (as the brief says)."""
    with Session(engine) as session:
        result = session.execute(
            update(OutboundItem).where(OutboundItem.status == "queued")
            .values(next_attempt_at=utcnow())
        )
        session.commit()
        return int(result.rowcount or 0)  # type: ignore[attr-defined]


def list_items(engine: Engine, status: str | None = None) -> list[OutboundItem]:
    with Session(engine) as session:
        query = select(OutboundItem).order_by(OutboundItem.id)
        if status:
            query = query.where(OutboundItem.status == status)
        return list(session.exec(query))


def get_item(session: Session, item_id: int) -> OutboundItem:
    row = session.get(OutboundItem, item_id)
    if row is None:
        raise NotFound(f"no queue entry {item_id}", hint="see 'mailhub queue list'")
    return row


def held_for(engine: Engine, recipient: str | None = None) -> list[OutboundItem]:
    with Session(engine) as session:
        query = select(OutboundItem).where(OutboundItem.status == "held")
        if recipient:
            from sqlalchemy import func
            query = query.where(func.lower(OutboundItem.recipient) == recipient.lower())
        return list(session.exec(query.order_by(OutboundItem.id)))
