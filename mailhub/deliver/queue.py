"""The outbound queue in the database: one row per recipient, payloads sealed, claims atomic.

All functions are blocking (database work): the async edges call them through a thread.
A row is claimed by setting ``sending_since`` in the same transaction that selects it
(``FOR UPDATE SKIP LOCKED`` on PostgreSQL, the single writer lock on SQLite), so two hub
instances never send the same row at once.

``GroupCommit`` is the serving process's one writer: a commit costs an fsync (a quarter of a
millisecond to several milliseconds), so the work of every message that arrives while one commit
is in flight shares the next commit, and writers in one process never wait on each other's
locks (SQLite's busy handler sleeps for up to 100 ms at a time).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections import deque
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import and_, bindparam, insert, or_, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from mailhub.deliver.fresh import AFTER_COMMIT
from mailhub.errors import NotFound, StoreError
from mailhub.instance import dead_here, pid_alive
from mailhub.store import audit
from mailhub.store.models import OutboundItem, utcnow

log = logging.getLogger("mailhub.queue")
T = TypeVar("T")
Job = tuple[Callable[[Session], Any], "Future[Any]"]

STATUSES = ("queued", "held", "sent", "failed")
# a claim older than this is taken to have died with its sender (another instance, or this
# one before a restart) and is claimed again; a live sender renews its claims well before
STALE_AFTER = timedelta(minutes=10)


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
    method: str = ""


_T = OutboundItem.__table__  # type: ignore[attr-defined]
_INSERT_ITEMS = insert(_T).returning(_T.c.id, _T.c.source_id, _T.c.recipient)
_EXISTING_MANY = (select(_T.c.source_id, _T.c.recipient)
                  .where(_T.c.source_id.in_(bindparam("sids", expanding=True))))


def item_row(**values: Any) -> dict[str, Any]:
    """A queue row with every column given (sqlmodel's defaults apply to ORM objects only)."""
    now = utcnow()
    row = {"status": "queued", "reason": "", "method": "", "relay": "smarthost", "kind": "mail",
           "case_id": None, "payload_id": None, "require_tls": False, "attempts": 0,
           "next_attempt_at": now, "sending_since": None, "created_at": now, "updated_at": now,
           "trace": "", "message_id": "", "sender": "", "claimed_by": ""}
    row.update(values)
    return row


def insert_items(session: Session, rows: list[dict[str, Any]]) -> list[int]:
    """Queue rows (from ``item_row``) with one statement; their ids in order."""
    if not rows:
        return []
    # (source_id, recipient) is unique (a table constraint): it tells the new rows apart
    ids = {(sid, rcpt): int(i) for i, sid, rcpt in session.execute(_INSERT_ITEMS, rows)}
    return [ids[(r["source_id"], r["recipient"])] for r in rows]


def insert_item(session: Session, **values: Any) -> int:
    return insert_items(session, [item_row(**values)])[0]


def existing_for_sources(session: Session, source_ids: Iterable[str]) -> set[tuple[str, str]]:
    """(source id, recipient) pairs already queued: a replayed message writes nothing twice."""
    wanted = sorted(set(source_ids))
    if not wanted:
        return set()
    return {(sid, rcpt) for sid, rcpt in session.execute(_EXISTING_MANY, {"sids": wanted})}


class GroupCommit:
    """One writer thread; jobs (``fn(session) -> result``) queued meanwhile share one commit.

    A job must not commit. When a batch fails, it is rolled back and every job in it runs again
    alone, so one bad job fails only its own caller. Results are returned after the commit.
    """

    def __init__(self, engine: Engine, *, max_batch: int = 256) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.commits = 0
        self.jobs = 0
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="db-commit", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[Session], T]) -> Future[T]:
        fut: Future[T] = Future()
        with self._cond:
            if self._closed:
                raise StoreError("the database writer is shut down")
            self._queue.append((fn, fut))
            self._cond.notify()
        return fut

    async def run(self, fn: Callable[[Session], T]) -> T:
        """Await ``fn``'s result once its transaction is committed."""
        return await asyncio.wrap_future(self.submit(fn))

    def call(self, fn: Callable[[Session], T]) -> T:
        """Blocking form, for worker threads."""
        return self.submit(fn).result()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = [self._queue.popleft()
                         for _ in range(min(len(self._queue), self.max_batch))]
            self._commit([job for job in batch if job[1].set_running_or_notify_cancel()])

    def _commit(self, batch: list[Job]) -> None:
        if not batch:
            return
        try:
            with Session(self.engine, expire_on_commit=False) as session:
                results = [fn(session) for fn, _ in batch]
                session.commit()
                hooks = session.info.pop(AFTER_COMMIT, ())
        except BaseException as exc:  # noqa: BLE001 - handed to the callers, never lost
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
                return
            for job in batch:
                self._commit([job])
            return
        for hook in hooks:  # e.g. fresh payloads for the senders: only what was committed
            try:
                hook()
            except Exception:  # noqa: BLE001 - an optimisation failed, the commit stands
                log.exception("an after-commit step failed")
        self.commits += 1
        self.jobs += len(batch)
        for (_, fut), result in zip(batch, results, strict=True):
            fut.set_result(result)

    def close(self) -> None:
        """Finish the queued jobs, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()


def claim_due(engine: Engine, limit: int, now: datetime | None = None,
              stale_after: timedelta = STALE_AFTER) -> list[Claimed]:
    """Claim up to ``limit`` due rows for sending (one transaction)."""
    with Session(engine) as session:
        claimed = claim_due_in(session, limit, now, stale_after)
        session.commit()
        return claimed


_CLAIM = (
    select(_T.c.id, _T.c.source_id, _T.c.message_id, _T.c.sender, _T.c.recipient, _T.c.relay,
           _T.c.kind, _T.c.require_tls, _T.c.attempts, _T.c.created_at, _T.c.payload_id,
           _T.c.method)
    .where(_T.c.status == "queued", _T.c.next_attempt_at <= bindparam("now"))
    .where(or_(_T.c.sending_since.is_(None), _T.c.sending_since < bindparam("stale")))
    .order_by(_T.c.next_attempt_at, _T.c.id)
    .limit(bindparam("limit"))
)
# rows this process is still sending are never claimed again, however old their claim;
# instances on one PostgreSQL skip each other's locked rows. Keyed by (PostgreSQL, rows held).
_CLAIM_HELD = _CLAIM.where(_T.c.id.not_in(bindparam("held", expanding=True)))
_CLAIMS = {(pg, held): (query.with_for_update(skip_locked=True) if pg else query)
           for held, query in ((False, _CLAIM), (True, _CLAIM_HELD)) for pg in (False, True)}
_MARK_CLAIMED = (update(_T).where(_T.c.id.in_(bindparam("ids", expanding=True)))
                 .values(sending_since=bindparam("now"), claimed_by=bindparam("owner"),
                         attempts=_T.c.attempts + 1))


def claim_due_in(session: Session, limit: int, now: datetime | None = None,
                 stale_after: timedelta = STALE_AFTER,
                 held: Collection[int] = (), owner: str = "") -> list[Claimed]:
    """``claim_due`` inside the caller's transaction (the caller commits); ``held``: rows the
    caller is still sending, left alone even when their claim looks stale; ``owner``: the
    claiming instance ("host:pid:random", ``mailhub.instance``)."""
    now = now or utcnow()
    conn = session.connection()
    query = _CLAIMS[(conn.dialect.name == "postgresql", bool(held))]
    params: dict[str, Any] = {"now": now, "stale": now - stale_after, "limit": limit}
    if held:
        params["held"] = sorted(held)
    rows = conn.execute(query, params).all()
    if not rows:
        return []
    conn.execute(_MARK_CLAIMED, {"ids": [r.id for r in rows], "now": now, "owner": owner})
    return [Claimed(r.id, r.source_id, r.message_id, r.sender, r.recipient, r.relay, r.kind,
                    r.require_tls, r.attempts + 1, r.created_at, r.payload_id or 0, r.method)
            for r in rows]


_RENEW = (update(_T).where(_T.c.id.in_(bindparam("ids", expanding=True)), _T.c.status == "queued",
                          _T.c.sending_since.is_not(None))
          .values(sending_since=bindparam("now")))


def renew_claims_in(session: Session, ids: Collection[int], now: datetime | None = None) -> None:
    """Stamp the claims a live sender still holds as fresh: a slow send (a big message on a
    slow link, a smarthost that takes minutes) must not look like a dead instance's claim."""
    if ids:
        session.connection().execute(_RENEW, {"ids": sorted(ids), "now": now or utcnow()})


_AUDIT_FACTS = select(_T.c.id, _T.c.message_id, _T.c.case_id, _T.c.recipient, _T.c.relay,
                      _T.c.kind).where(_T.c.id.in_(bindparam("ids", expanding=True)))


def _reply_fact(reply: str) -> str:
    """The next hop's reply as an audit fact: outside text, so one line, clipped, and never
    mistaken for key material (the audit refuses armor, and a refused mark would be lost)."""
    text = " ".join(reply.split())[:300]
    return text.replace("-----BEGIN ", "-----BEGIN_")


def _audit_outcome(session: Session, replies: dict[int, str], action: str) -> None:
    """One audit entry per row that was sent or finally failed (with the next hop's reply)."""
    rows = sorted(session.connection().execute(_AUDIT_FACTS, {"ids": list(replies)}).all())
    audit.append_many(session, [
        audit.Pending("delivery", action, message_id=r.message_id or None, case_id=r.case_id,
                      detail={"recipient": r.recipient, "queue_id": r.id, "relay": r.relay,
                              "kind": r.kind, "reply": _reply_fact(replies[r.id])})
        for r in rows])


_MARK_SENT = (update(_T).where(_T.c.id == bindparam("row_id"))
              .values(status="sent", sending_since=None, updated_at=bindparam("at"),
                      reason=bindparam("reply")))


def mark_sent_many(session: Session, sent: Iterable[tuple[int, str]]) -> None:
    """Mark rows sent, each with its own reply from the next hop (a real one names its queue
    id, so no two replies are alike): one statement for all of them, and their audit entries."""
    replies = dict(sent)
    if not replies:
        return
    now = utcnow()
    session.connection().execute(_MARK_SENT, [
        {"row_id": item_id, "at": now, "reply": reply[:500]} for item_id, reply in replies.items()])
    _audit_outcome(session, replies, "sent")


def mark_sent_in(session: Session, ids: list[int], reply: str = "") -> None:
    mark_sent_many(session, [(item_id, reply) for item_id in ids])


def mark_retry_in(session: Session, item_id: int, reason: str, next_at: datetime) -> None:
    session.execute(
        update(OutboundItem).where(OutboundItem.id == item_id)
        .values(sending_since=None, next_attempt_at=next_at, reason=reason[:500],
                updated_at=utcnow())
    )


def mark_failed_in(session: Session, item_id: int, reason: str) -> None:
    session.execute(
        update(OutboundItem).where(OutboundItem.id == item_id)
        .values(status="failed", sending_since=None, reason=reason[:500], updated_at=utcnow())
    )
    _audit_outcome(session, {item_id: reason}, "failed")


def _commit_one(engine: Engine, fn: Callable[[Session], None]) -> None:
    with Session(engine) as session:
        fn(session)
        session.commit()


def mark_sent(engine: Engine, ids: list[int], reply: str = "") -> None:
    if ids:
        _commit_one(engine, lambda s: mark_sent_in(s, ids, reply))


def mark_retry(engine: Engine, item_id: int, reason: str, next_at: datetime) -> None:
    _commit_one(engine, lambda s: mark_retry_in(s, item_id, reason, next_at))


def mark_failed(engine: Engine, item_id: int, reason: str) -> None:
    _commit_one(engine, lambda s: mark_failed_in(s, item_id, reason))


def recover_inflight(engine: Engine, host: str | None = None,
                     alive: Callable[[int], bool] = pid_alive,
                     stale_after: timedelta = STALE_AFTER) -> list[OutboundItem]:
    """At start: rows that were being sent when their sender died are queued again at once
    (and reported). That is a claim with no owner (made before owners were recorded), one
    whose owner ran on this ``host`` and is gone, or one gone stale. A fresh claim of another
    host's instance is left alone: that instance may be sending the row right now (several
    instances on one PostgreSQL), and if it died the claim goes stale and is taken then."""
    host = socket.gethostname() if host is None else host
    stale = utcnow() - stale_after
    with Session(engine, expire_on_commit=False) as session:  # the rows are reported after
        rows = []
        for row in session.exec(select(OutboundItem).where(
                and_(OutboundItem.status == "queued",
                     OutboundItem.sending_since.is_not(None)))):  # type: ignore[union-attr]
            assert row.sending_since is not None
            if row.claimed_by and not dead_here(row.claimed_by, host, alive) \
                    and row.sending_since >= stale:
                log.info("delivery of queue id %s (%s) is claimed by %s, which may be running; "
                         "left to it", row.id, row.message_id, row.claimed_by)
                continue
            log.warning("delivery of queue id %s (%s) was in flight at a crash; sending again",
                        row.id, row.message_id)
            row.sending_since, row.claimed_by = None, ""
            row.next_attempt_at = utcnow()
            session.add(row)
            rows.append(row)
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
