"""The delivery worker: claims due queue rows and sends them, retrying with exponential backoff.

It runs as an asyncio task that claims rows (through the ``GroupCommit`` writer, awaited on the
loop: no thread in between) and hands them to ``[delivery].workers`` sender threads, each with
its own reused connection per next hop, through one queue (a row is one ``put``: no future, no
executor bookkeeping). Rows are claimed (``sending_since`` set, committed) before they are sent,
and a row is marked sent right after the next hop's 250; with a ``GroupCommit`` those marks
share commits with other work, so a sender goes on to its next message without waiting for the
disk. A crash between the 250 and that commit is the only way a message can go out twice: such
rows still carry ``sending_since`` and are reported at the next start by ``recover_inflight``.
New rows are claimed while the last ones of a batch are still being sent, so the connections
never idle while there is work. A sender thread takes the rows already waiting for it (up to
``CHAIN``) and sends them back to back, pipelined (``SmtpConnection.send_many``); their outcomes
are recorded once the chain is through, so a crash in between may send up to ``CHAIN`` rows
again. A batch that was not full is followed by the next claim only once new rows were
announced (``wake``) or the idle poll comes round, so a stream of single messages does not cost
an empty claim each. Rows the pipeline has just queued come with their bytes from memory
(``deliver/fresh.py``) instead of being read back from the database and unsealed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from queue import Empty, SimpleQueue

from sqlalchemy.engine import Engine
from sqlmodel import Session

from mailhub.config import DeliveryConfig
from mailhub.deliver import queue
from mailhub.deliver.claims import SentFlush, log_failed_write, renew_claims
from mailhub.deliver.fresh import FreshPayloads, Opened, Unreadable, WirePayload, take_claimed
from mailhub.deliver.hops import NextHops
from mailhub.deliver.payload_files import PayloadFiles
from mailhub.deliver.payloads import sealed_payloads_in
from mailhub.deliver.retry import backoff_delay, next_step
from mailhub.deliver.smtp_client import Outgoing, SendResult
from mailhub.errors import StoreError
from mailhub.instance import default_instance_id
from mailhub.spool.spool import Sealer
from mailhub.store.models import utcnow

log = logging.getLogger("mailhub.deliver")

CHAIN = 8  # rows a sender thread takes at once and sends back to back

# a queued row of these methods carries what the hub's own PGP/MIME or S/MIME writer made: its
# body needs no CRLF or dot check before DATA (smtp_wire.data_payload's ``clean_body``)
WRITTEN_BY_HUB = frozenset({"openpgp", "smime"})
CLOSE_GRACE = 30.0  # seconds a shutdown waits for sends in progress before cutting them off


# called inside the transaction that marks the row failed: the row and its DSN commit together
OnFailed = Callable[[Session, queue.Claimed, str], None]
OnSent = Callable[[queue.Claimed, str], None]


class DeliveryWorker:
    """Sends queued rows to the smarthost or the internal relay."""

    def __init__(self, engine: Engine, sealer: Sealer, cfg: DeliveryConfig, *,
                 helo: str = "mailhub", on_failed: OnFailed | None = None,
                 on_sent: OnSent | None = None, batch: int = 64,
                 commits: queue.GroupCommit | None = None,
                 files: PayloadFiles | None = None) -> None:
        self.engine = engine
        self.files = files  # where large payloads lie (SQLite), to read those not in memory
        self.commits = commits
        self.sealer = sealer
        self.cfg = cfg
        self.helo = helo
        self.on_failed = on_failed
        self.on_sent = on_sent
        self.batch = batch
        self.stale_after = queue.STALE_AFTER  # a claim this old was lost with its sender
        self.renew_every = self.stale_after.total_seconds() / 5  # so ours never look that old
        self._held: set[int] = set()  # claimed rows not yet settled (under ``_idle``)
        self.owner = default_instance_id()  # whose claims ours are (``recover_inflight``)
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self.hops = NextHops(cfg, helo)
        self._jobs: SimpleQueue[tuple[queue.Claimed, WirePayload | None] | None] = SimpleQueue()
        self.fresh = FreshPayloads()  # payloads just queued, handed over in memory
        self._senders: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._inflight = 0
        self._idle = threading.Condition()
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None
        self._sent: list[tuple[int, str]] = []  # sent, not yet recorded: one UPDATE for all
        self._sent_flush_queued = False

    def wake(self) -> None:
        """New rows are queued: claim now (callable from any thread)."""
        if self._loop is None or threading.get_ident() == self._loop_thread:
            self._wake.set()
            return
        try:
            self._loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # the loop is closed: nothing is left to wake
            pass

    def _write(self, fn: Callable[[Session], object], *, wait: bool) -> None:
        """Record an outcome: through the group commit when there is one (``wait``: block
        until it is committed), else in a commit of its own."""
        if self.commits is None:
            with Session(self.engine) as session:
                fn(session)
                session.commit()
        elif wait:
            self.commits.call(fn)
        else:
            self.commits.submit(fn).add_done_callback(log_failed_write)

    def _record_sent(self, item_id: int, reply: str) -> None:
        """Queue the "sent" mark; all marks waiting when the commit thread gets to them go
        into one UPDATE."""
        if self.commits is None:
            self._write(lambda s: queue.mark_sent_in(s, [item_id], reply), wait=True)
            return
        with self._idle:
            self._sent.append((item_id, reply))
            if self._sent_flush_queued:
                return
            self._sent_flush_queued = True
        self.commits.submit(SentFlush(self.take_sent)).add_done_callback(log_failed_write)

    def take_sent(self) -> list[tuple[int, str]]:
        with self._idle:
            batch, self._sent = self._sent, []
            self._sent_flush_queued = False
        return batch

    def deliver_one(self, item: queue.Claimed, sealed: WirePayload,
                    result: SendResult | None = None) -> str:
        """Send one claimed row (unless ``result`` says how its sending went) and record the
        outcome (blocking; runs in a worker thread)."""
        if result is None:
            data = self._open(item, sealed)
            result = self.hops.connection(item.relay).send(item.sender, item.recipient, data,
                                                       require_tls=item.require_tls,
                                                       smtputf8=_needs_smtputf8(item),
                                                       clean_body=item.method in WRITTEN_BY_HUB)
        now = utcnow()
        outcome, next_at = next_step(result, attempts=item.attempts, created_at=item.created_at,
                                     now=now, cfg=self.cfg)
        if outcome == "sent":
            self._record_sent(item.id, result.reply)
            log.info("sent queue_id=%s message_id=%s to=%s relay=%s", item.id, item.message_id,
                     item.recipient, item.relay)
            if self.on_sent:
                self.on_sent(item, result.reply)
        elif outcome == "retry":
            assert next_at is not None
            self._write(lambda s: queue.mark_retry_in(s, item.id, result.reply, next_at),
                        wait=False)
            log.warning("deferred queue_id=%s message_id=%s to=%s: %s (next try %s)", item.id,
                        item.message_id, item.recipient, result.reply, next_at.isoformat())
        else:
            self._fail(item, result.reply)
        return outcome

    def _fail(self, item: queue.Claimed, reason: str) -> None:
        """Mark the row failed and queue its DSN (``on_failed``) in one commit: no crash or
        failed write can leave a failed row whose sender is never told (it stays queued)."""

        def mark(session: Session) -> None:
            queue.mark_failed_in(session, item.id, reason)
            if self.on_failed is not None:
                self.on_failed(session, item, reason)

        self._write(mark, wait=True)
        log.error("failed queue_id=%s message_id=%s to=%s: %s", item.id, item.message_id,
                  item.recipient, reason)
        if self.on_failed is not None:
            self.wake()  # the DSN is queued

    def _claim(self, session: Session) -> tuple[list[queue.Claimed], dict[int, WirePayload]]:
        claimed = queue.claim_due_in(session, self.batch, stale_after=self.stale_after,
                                     held=self._held_now(), owner=self.owner)
        payloads: dict[int, WirePayload] = {}
        payloads.update(take_claimed(session.info, self.fresh,
                                     [(c.id, c.payload_id) for c in claimed]))
        broken: dict[int, str] = {}
        payloads.update(sealed_payloads_in(
            session, (c.payload_id for c in claimed if c.payload_id not in payloads),
            self.files, broken))
        payloads.update((pid, Unreadable(why)) for pid, why in broken.items())
        return claimed, payloads

    def _claim_alone(self) -> tuple[list[queue.Claimed], dict[int, WirePayload]]:
        """The claim in a transaction of its own (no group commit)."""
        with Session(self.engine, expire_on_commit=False) as session:
            result = self._claim(session)
            session.commit()
        return result

    def run_batch(self) -> int:
        """Claim and dispatch one batch (blocking); returns once at most ``workers`` rows are
        still being sent, so the next claim overlaps the tail of this one."""
        claimed, payloads = (self.commits.call(self._claim) if self.commits is not None
                             else self._claim_alone())
        if not claimed:
            return 0
        self._dispatch(claimed, payloads)
        with self._idle:
            self._idle.wait_for(lambda: self._inflight <= self.cfg.workers)
        return len(claimed)

    async def run_batch_async(self) -> int:
        """``run_batch`` on the event loop: the claim goes straight to the commit thread and
        the loop is called back only if it has to wait for the tail of the batch (a thread
        hop per batch less, which costs about as much CPU as the claim itself)."""
        if self.commits is not None:
            claimed, payloads = await self.commits.run(self._claim)
        else:
            claimed, payloads = await asyncio.to_thread(self._claim_alone)
        self._dispatch(claimed, payloads)
        with self._idle:
            if self._inflight <= self.cfg.workers:
                return len(claimed)
            loop = asyncio.get_running_loop()
            waiter = self._waiter = (loop, loop.create_future())
        await waiter[1]
        return len(claimed)

    def _dispatch(self, claimed: list[queue.Claimed], payloads: dict[int, WirePayload]) -> None:
        if not claimed:
            return
        self._start_senders()
        with self._idle:
            self._inflight += len(claimed)
            self._held.update(c.id for c in claimed)
        for c in claimed:
            self._jobs.put((c, payloads.get(c.payload_id)))

    def _start_senders(self) -> None:
        with self._lock:
            while len(self._senders) < self.cfg.workers:
                thread = threading.Thread(target=self._sender, daemon=True,
                                          name=f"deliver_{len(self._senders)}")
                thread.start()
                self._senders.append(thread)

    def _sender(self) -> None:
        """One sender thread: claimed rows from the queue until the ``None`` that ends it.
        Rows already waiting are taken together (a few, so that the other connections get
        theirs) and sent back to back over this thread's connection."""
        while (job := self._jobs.get()) is not None:
            jobs, last = [job], False
            while len(jobs) < CHAIN:
                try:
                    more = self._jobs.get_nowait()
                except Empty:
                    break
                if more is None:
                    last = True
                    break
                jobs.append(more)
            self._deliver_chain(jobs)
            if last:
                return

    def _open(self, item: queue.Claimed, sealed: WirePayload) -> bytes:
        """A claimed row's message, unsealed (its payload id is the associated data)."""
        if isinstance(sealed, Opened):
            return sealed.data
        if isinstance(sealed, Unreadable):  # retried with backoff, like any internal error
            raise StoreError(f"queue_id={item.id}: {sealed.reason}")
        return self.sealer.open(sealed, str(item.payload_id).encode())

    def _deliver_chain(self, jobs: list[tuple[queue.Claimed, WirePayload | None]]) -> None:
        """Send the rows pipelined per next hop (``SmtpConnection.send_many``), then record each
        outcome as ``deliver_one`` does; a row the chain did not send goes alone."""
        results: dict[int, SendResult] = {}
        groups: dict[str, list[tuple[queue.Claimed, WirePayload]]] = {}
        for item, sealed in jobs:
            if sealed is not None and not isinstance(sealed, Unreadable):
                groups.setdefault(item.relay, []).append((item, sealed))
        try:
            for relay, group in groups.items():
                if len(group) < 2:
                    continue
                sent = self.hops.connection(relay).send_many([
                    Outgoing(item.sender, item.recipient, self._open(item, sealed),
                             item.require_tls, _needs_smtputf8(item),
                             item.method in WRITTEN_BY_HUB)
                    for item, sealed in group])
                results.update((item.id, r) for (item, _), r in zip(group, sent, strict=True))
        except Exception:  # e.g. a payload that does not open: each row alone says which
            log.exception("pipelined delivery failed; sending the rest one by one")
        for item, sealed in jobs:
            self._safe_deliver(item, sealed, results.get(item.id))

    def wait_idle(self) -> None:
        """Block until no claimed row is still being sent."""
        with self._idle:
            self._idle.wait_for(lambda: self._inflight == 0)

    def _safe_deliver(self, item: queue.Claimed, sealed: WirePayload | None,
                      result: SendResult | None = None) -> None:
        try:
            if sealed is None:
                self._fail(item, "payload missing")
                return
            self.deliver_one(item, sealed, result)
        except Exception:  # one broken row must not stop delivery of the others
            log.exception("delivery of queue_id=%s crashed; retrying later", item.id)
            next_at = utcnow() + backoff_delay(item.attempts, self.cfg.retry_initial,
                                               self.cfg.retry_max)
            try:
                self._write(lambda s: queue.mark_retry_in(s, item.id, "internal error; see the "
                                                          "log", next_at), wait=False)
            except Exception:
                log.exception("could not record the retry of queue_id=%s", item.id)
        finally:
            with self._idle:
                self._inflight -= 1
                self._held.discard(item.id)  # its outcome is written (or queued before a claim)
                waiter = None
                if self._inflight <= self.cfg.workers:  # only then is anyone waiting for it
                    self._idle.notify_all()
                    waiter, self._waiter = self._waiter, None
            if waiter is not None:
                try:
                    waiter[0].call_soon_threadsafe(_resolve, waiter[1])
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    pass

    async def run(self, stop: asyncio.Event, idle: float = 1.0) -> None:
        """Claim and send until ``stop``; due retries are found by polling every ``idle`` s."""
        self._loop = loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        stopper = asyncio.ensure_future(stop.wait())
        stopper.add_done_callback(lambda _: self._wake.set())
        renewer = asyncio.ensure_future(renew_claims(
            self._held_now, lambda fn: self._write(fn, wait=True), stop, self.renew_every))
        try:
            while not stop.is_set():
                self._wake.clear()  # before the claim: a row announced from now on is seen
                try:
                    n = await self.run_batch_async()
                except Exception:
                    log.exception("delivery loop error; continuing")
                    n = 0
                if n >= self.batch or self._wake.is_set():
                    continue
                timer = loop.call_later(idle, self._wake.set)
                await self._wake.wait()
                timer.cancel()
        finally:
            stopper.cancel()
            renewer.cancel()

    def _held_now(self) -> set[int]:
        with self._idle:
            return set(self._held)

    def close(self, grace: float = CLOSE_GRACE) -> None:
        """Send what is already queued, stop the sender threads, then QUIT every connection.

        A next hop that has not answered within ``grace`` seconds (it may take ten minutes to
        reply to a message's data) is cut off: those rows and any still queued are retried
        after the restart, so a shutdown never waits on a hung smarthost."""
        with self._lock:
            senders, self._senders = self._senders, []
        for _ in senders:
            self._jobs.put(None)
        deadline = time.monotonic() + grace
        for thread in senders:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [thread for thread in senders if thread.is_alive()]
        if stuck:
            log.warning("shutting down: %d delivery connection(s) still waiting for the next "
                        "hop after %.0f s are cut off; their messages are retried after the "
                        "restart", len(stuck), grace)
            self.hops.cut_off()
            for thread in stuck:
                thread.join(grace)
        self.hops.close()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _needs_smtputf8(item: queue.Claimed) -> bool:
    return not (item.sender.isascii() and item.recipient.isascii())
