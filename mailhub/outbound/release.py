"""Held messages: evaluate again (``queue release``, or automatically when a key arrives), or drop.

A release runs the same policy chain and protection as the first attempt, for that one recipient;
if the recipient still has no usable key the row stays held with the new reason.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from sqlalchemy import or_, select, update
from sqlmodel import Session

from mailhub.crypto.engine import CryptoEngine
from mailhub.crypto.keystore import as_utc
from mailhub.deliver import payloads, queue
from mailhub.deliver.retention import drop_unreferenced
from mailhub.deliver.retry import backoff_delay
from mailhub.errors import MailhubError
from mailhub.outbound.pipeline import OutboundPipeline, Prepared, visible_recipients
from mailhub.policy.outbound import RecipientContext, decide_recipient
from mailhub.policy.trace import trace_to_json
from mailhub.store import audit
from mailhub.store.models import OutboundItem, Payload, utcnow

log = logging.getLogger("mailhub.queue")
_NOT_HELD_HINT = {
    "queued": "it was already released and waits for delivery (a serving hub releases held "
              "messages by itself once their recipient's key is imported)",
    "sent": "it was already released and sent (a serving hub releases held messages by itself "
            "once their recipient's key is imported)",
    "failed": "it was dropped, or delivery gave up on it: 'mailhub queue list' shows why",
    "": "only held messages can be released",
}


async def release_async(hub, pipeline: OutboundPipeline, item_id: int, *,  # type: ignore[no-untyped-def]
                        actor: str) -> OutboundItem:
    def load() -> tuple[OutboundItem, bytes]:
        with Session(hub.engine) as session:
            row = queue.get_item(session, item_id)
            if row.status != "held":
                raise MailhubError(f"queue entry {item_id} is {row.status}, not held",
                                   hint=_NOT_HELD_HINT.get(row.status, _NOT_HELD_HINT[""]))
            found = payloads.load_payloads(hub.engine, [row.payload_id or 0], hub.payload_files)
            sealed = found.get(row.payload_id or 0)
            if sealed is None:
                raise MailhubError(f"queue entry {item_id} has lost its payload")
            return row, hub.sealer.open(sealed, str(row.payload_id).encode())

    row, raw = await asyncio.to_thread(load)
    cfg = hub.config
    hub.key_snapshot.refresh(force=True)
    ctx = RecipientContext(address=row.recipient, hub_domain=cfg.hub.domain,
                           internal_relay_set=cfg.delivery.internal_relay is not None,
                           keys=hub.key_snapshot.candidates(row.recipient),
                           consent_plain_email=pipeline.consent(row.recipient))
    decision = decide_recipient(ctx, hub.policy_cache.current())
    prep = Prepared(row.source_id, raw, row.message_id, row.sender, visible_recipients(raw),
                    {row.recipient: decision})
    await pipeline.protect(prep)

    def save() -> OutboundItem:
        with Session(hub.engine, expire_on_commit=False) as session:
            _lock_row(session, item_id)  # read and written under one lock: no lost update
            current = queue.get_item(session, item_id)
            if current.status != "held":
                return current  # released meanwhile by someone else
            current.trace = trace_to_json(decision.trace)
            current.updated_at = utcnow()
            data = prep.outputs.get(row.recipient)
            held_copy: int | None = None
            if data is None:
                current.reason = prep.failures.get(row.recipient) or decision.reason
                # tried again after a backoff (or at once when a key for it arrives), not at
                # every pass of the auto-release loop
                current.attempts += 1
                current.next_attempt_at = current.updated_at + backoff_delay(
                    current.attempts, cfg.delivery.retry_initial, cfg.delivery.retry_max)
                audit.append(session, actor, "still-held", message_id=row.message_id,
                             case_id=row.case_id, detail={"queue_id": item_id,
                                                          "reason": current.reason[:300]})
            else:
                pid = payloads.add_payload(session, b"")
                payload = session.get(Payload, pid)
                assert payload is not None
                payload.sealed = hub.sealer.seal(data, str(pid).encode())
                held_copy, current.payload_id = current.payload_id, pid
                current.status = "queued"
                current.attempts = 0  # delivery's own backoff starts afresh
                current.method = decision.method or "plaintext"
                current.relay = decision.relay
                current.require_tls = decision.require_tls
                current.reason = f"released by {actor}"
                current.next_attempt_at = utcnow()
                audit.append(session, actor, "released", message_id=row.message_id,
                             case_id=row.case_id, detail={"queue_id": item_id,
                                                          "method": current.method})
            session.add(current)
            if held_copy is not None:
                session.flush()
                # the held original goes with the last row that kept it (others may share it)
                drop_unreferenced(session, [held_copy])
            session.commit()
            return current

    return await asyncio.to_thread(save)


def release(hub, item_id: int, *, actor: str) -> OutboundItem:  # type: ignore[no-untyped-def]
    crypto = CryptoEngine(0)
    try:
        return asyncio.run(release_async(hub, OutboundPipeline(hub, crypto), item_id, actor=actor))
    finally:
        crypto.close()


def _lock_row(session: Session, item_id: int) -> None:
    """Hold a queue row against other writers until the session commits: a concurrent
    ``queue drop``, the serving hub's auto-release or its delivery must not change the row
    between the status check and the write (SQLite: its one write lock, taken now; PostgreSQL:
    the row's lock)."""
    t = OutboundItem.__table__  # type: ignore[attr-defined]
    if session.get_bind().dialect.name == "sqlite":
        session.execute(update(t).where(t.c.id == -1).values(id=t.c.id))
    else:
        session.execute(select(t.c.id).where(t.c.id == item_id).with_for_update())


def drop(hub, item_id: int, *, actor: str, why: str) -> OutboundItem:  # type: ignore[no-untyped-def]
    """Mark a held or queued row failed, with who and why, unless it is being sent right now.

    The change is one guarded UPDATE, not a read and then a write: a serving hub may claim,
    send or release the row meanwhile, and its "sent" would otherwise overwrite the drop (or the
    drop a "sent"), so the CLI would report as dropped a message that was delivered."""
    if not why.strip():
        raise MailhubError("a reason is required to drop a message")
    reason = f"dropped by {actor}: {why.strip()}"[:500]
    now = utcnow()
    with Session(hub.engine, expire_on_commit=False) as session:
        t = OutboundItem.__table__  # type: ignore[attr-defined]
        done = session.execute(
            update(t).where(t.c.id == item_id, t.c.status.in_(("held", "queued")),
                            or_(t.c.sending_since.is_(None),
                                t.c.sending_since < now - queue.STALE_AFTER))
            .values(status="failed", reason=reason, updated_at=now, sending_since=None))
        row = queue.get_item(session, item_id)
        if not done.rowcount:  # type: ignore[attr-defined]
            session.rollback()
            _not_droppable(row)
        audit.append(session, actor, "dropped", message_id=row.message_id, case_id=row.case_id,
                     detail={"queue_id": item_id, "why": why.strip()[:300]})
        session.commit()
        return row


def _not_droppable(row: OutboundItem) -> None:
    """Why ``drop`` changed nothing: already finished, or being sent at this moment."""
    if row.status in ("sent", "failed"):
        raise MailhubError(f"queue entry {row.id} is already {row.status}",
                           hint="'mailhub queue list' shows its reason")
    raise MailhubError(
        f"queue entry {row.id} is being sent right now (claimed by {row.claimed_by or 'a hub'})",
        hint="nothing was changed: if the next hop accepts it, it is sent; otherwise try "
             "again once it waits for a retry. A claim left by a stopped hub is taken back "
             "when 'mailhub serve' starts (or after ten minutes)")


def release_due(next_attempt_at: datetime, decided_at: datetime, key_changed_at: datetime | None,
                now: datetime) -> bool:
    """Whether a held row whose recipient has a usable key is tried again now: when its backoff
    is over (a row the pipeline held has none), or at once when a key for its recipient
    arrived or changed after the row was last decided. A failure that repeats (a key gpg
    refuses, say) is then tried every ``[delivery].retry_max`` seconds at most (an hour by
    default), not at every pass of the loop."""
    if key_changed_at is not None and key_changed_at > as_utc(decided_at):
        return True
    return as_utc(next_attempt_at) <= now


async def auto_release(hub, pipeline: OutboundPipeline) -> int:  # type: ignore[no-untyped-def]
    """Release held rows whose recipient now has a usable key (runs periodically in serve)."""
    held = await asyncio.to_thread(queue.held_for, hub.engine)
    released = 0
    now = utcnow()
    for row in held:
        if row.kind != "mail" or not hub.key_snapshot.has_usable(row.recipient):
            continue
        if not release_due(row.next_attempt_at, row.updated_at,
                           hub.key_snapshot.changed_at(row.recipient), now):
            continue
        try:
            result = await release_async(hub, pipeline, row.id or 0, actor="auto-release")
        except MailhubError as exc:
            log.warning("auto-release of %s failed: %s", row.id, exc)
            continue
        released += result.status == "queued"
    return released
