"""The dispatcher: wakes at the next due step, claims what is due, and sends it.

Waking: apscheduler 3 (``AsyncIOScheduler``) holds ONE 'date' job, re-armed after every run to
min(next due step, now + ``[scheduler].check_interval``). Its misfire behaviour is explicit:
``misfire_grace_time=None`` (run however late; apscheduler's default would skip a job whose time
passed, e.g. while the event loop was busy) and ``coalesce=True`` (runs that piled up collapse
into one). Runs are serialised by a lock, not by apscheduler: ``max_instances=2`` so that the
wake-up a finishing run arms is never skipped as "already running". None of that is what keeps care steps safe, though: the job only says "look now", and
every wake-up runs ``run_due``, which scans the ledger. So whatever came due while the process
was down is found at start-up: sent at once when still within its window, marked ``missed`` (and
the coordinator told) when not. A light watcher also re-arms the job when another process
(``mailhub cases set``) puts a step earlier than the armed time; it reads one indexed MIN().

The job store is apscheduler's in-memory one on purpose: the ledger is the only durable state.
Start-up therefore loads nothing but the next due time, whatever the number of pending steps.
``run_due`` also works without apscheduler (``mailhub schedule run-due``, for cron).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytz
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.date import DateTrigger
from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlmodel import Session

from mailhub.errors import MailhubError
from mailhub.instance import dead_here, default_instance_id, pid_alive
from mailhub.scheduler import ledger
from mailhub.scheduler.ledger import STALE_CLAIM, Claim
from mailhub.scheduler.sender import Outcome, Processor, StepSender
from mailhub.store.models import OutboundItem, ScheduleEntry, utcnow

log = logging.getLogger("mailhub.scheduler")

JOB_ID = "mailhub-scheduler-wake"


def release_dead_claims(engine: Engine, host: str, alive: Callable[[int], bool]) -> int:
    """At start-up: claims left by processes of this host that are gone are free at once
    (instead of after STALE_CLAIM). Claim owners are "host:pid:random" (see the dispatcher)."""
    with Session(engine) as session:
        ledger.lock_writes(session)
        stmt = select(ScheduleEntry).where(ScheduleEntry.status == "pending",  # index range
                                           ScheduleEntry.claimed_by > "")
        freed = 0
        for row in session.scalars(stmt):
            if dead_here(row.claimed_by, host, alive):
                log.warning("schedule row %s (case %s, step %s): %s is gone; claim released",
                            row.id, row.case_id, row.step, row.claimed_by)
                row.claimed_by, row.claimed_at = "", None
                session.add(row)
                freed += 1
        session.commit()
    return freed


def sync_released(engine: Engine) -> int:
    """Held steps whose queue copies were all released (queued or sent) since become sent."""
    held = (select(OutboundItem.id).where(OutboundItem.source_id == ScheduleEntry.queue_source_id,
                                          OutboundItem.kind == "mail",
                                          OutboundItem.status.not_in(("queued", "sent")))  # type: ignore[attr-defined]
            .exists())
    has_rows = (select(OutboundItem.id).where(OutboundItem.source_id == ScheduleEntry.queue_source_id,
                                              OutboundItem.kind == "mail").exists())
    with Session(engine) as session:
        result = session.execute(
            update(ScheduleEntry)
            .where(ScheduleEntry.status == "held", ScheduleEntry.queue_source_id != "",
                   has_rows, ~held)
            .values(status="sent", reason="released from hold", updated_at=utcnow()))
        session.commit()
        return int(result.rowcount or 0)  # type: ignore[attr-defined]


@dataclass
class RunReport:
    """What one ``run_due`` pass did. Per handed-over step, seconds after its due time:
    ``fired`` when it was claimed, ``lateness`` when the outbound path had queued (or held) it."""

    claimed: int = 0
    sent: int = 0
    held: int = 0
    missed: int = 0
    skipped: int = 0
    pending: int = 0
    errors: int = 0
    outcomes: list[Outcome] = field(default_factory=list)
    lateness: list[float] = field(default_factory=list)
    fired: list[float] = field(default_factory=list)

    def add(self, outcome: Outcome, fired: float, late: float) -> None:
        self.outcomes.append(outcome)
        setattr(self, outcome.status, getattr(self, outcome.status) + 1)
        if outcome.status in ("sent", "held"):
            self.fired.append(fired)
            self.lateness.append(late)

    def as_json(self) -> dict[str, Any]:
        return {"claimed": self.claimed, "sent": self.sent, "held": self.held,
                "missed": self.missed, "skipped": self.skipped, "pending": self.pending,
                "errors": self.errors,
                "steps": [{"case": o.case_id, "step": o.step, "status": o.status,
                           "reason": o.reason} for o in self.outcomes]}


class Dispatcher:
    """Sends due care-plan steps for one hub instance (several may share one database)."""

    def __init__(self, hub: Any, instance_id: str | None = None, *,
                 process: Processor | None = None, on_queued: Callable[[], None] | None = None,
                 check_interval: float | None = None, poll_interval: float = 1.0,
                 batch: int = 50, concurrency: int = 4,
                 stale_after: timedelta = STALE_CLAIM,
                 on_run: Callable[[RunReport], None] | None = None) -> None:
        self.hub = hub
        self.instance_id = instance_id or default_instance_id()
        self.check_interval = float(check_interval or hub.config.scheduler.check_interval)
        self.poll_interval = poll_interval
        self.batch = batch
        self.concurrency = concurrency
        self.stale_after = stale_after
        self._process = process
        self._on_queued = on_queued
        self.on_run = on_run
        self._sender: StepSender | None = None
        self._crypto: Any = None
        self._scheduler: AsyncIOScheduler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._armed_at: datetime | None = None
        self._stopping = False
        self.ready = asyncio.Event()  # set once start-up caught up and the wake-up is armed

    # ---- sending

    @property
    def sender(self) -> StepSender:
        if self._sender is None:
            process = self._process
            if process is None:  # stand-alone (CLI): our own outbound pipeline, crypto inline
                from mailhub.crypto.engine import CryptoEngine
                from mailhub.outbound.pipeline import OutboundPipeline

                self._crypto = CryptoEngine(0)
                process = OutboundPipeline(self.hub, self._crypto, on_queued=self._on_queued).process
            self._sender = StepSender(self.hub, process, on_queued=self._on_queued)
        return self._sender

    async def _one(self, claim: Claim, now: datetime, sem: asyncio.Semaphore,
                   report: RunReport) -> None:
        async with sem:
            try:
                outcome = await self.sender.send(claim, now)
            except Exception as exc:  # one bad step must not stop the others
                report.errors += 1
                if isinstance(exc, MailhubError):
                    log.error("case %s step %s failed: %s; retried after the claim expires",
                              claim.case_id, claim.step, exc)
                else:
                    log.exception("case %s step %s failed; retried after the claim expires",
                                  claim.case_id, claim.step)
                return
            report.add(outcome, (claim.claimed_at - claim.send_at_utc).total_seconds(),
                       (utcnow() - claim.send_at_utc).total_seconds())

    async def run_due_async(self, now: datetime | None = None) -> RunReport:
        """Claim and handle everything due at ``now`` (default: the clock), batch by batch."""
        report = RunReport()
        sem = asyncio.Semaphore(self.concurrency)
        released = await asyncio.to_thread(sync_released, self.hub.engine)
        if released:
            log.info("%d held step(s) were released from hold and count as sent", released)
        seen: set[int] = set()
        while True:
            at = now or utcnow()
            claims = await asyncio.to_thread(ledger.claim_due, self.hub.engine, at,
                                             self.instance_id, self.batch,
                                             stale_after=self.stale_after)
            fresh = [c for c in claims if c.id not in seen]
            if not fresh:
                break
            seen.update(c.id for c in fresh)
            report.claimed += len(fresh)
            await asyncio.gather(*(self._one(c, at, sem, report) for c in fresh))
            if len(claims) < self.batch:
                break
        if self.on_run is not None and report.claimed:
            self.on_run(report)
        if report.claimed:
            log.info("scheduler run: %d claimed, %d sent, %d held, %d missed, %d skipped, "
                     "%d waiting, %d errors", report.claimed, report.sent, report.held,
                     report.missed, report.skipped, report.pending, report.errors)
        return report

    def run_due(self, now: datetime | None = None) -> RunReport:
        """``run_due_async`` for callers without an event loop (``schedule run-due``)."""
        try:
            return asyncio.run(self.run_due_async(now))
        finally:
            self.close()

    def _warm(self) -> None:
        """Load what the first send needs (policy, key snapshot, templates) before it is due."""
        self.hub.policy_cache.current()
        self.hub.key_snapshot.refresh(force=True)
        renderer = self.sender.renderer
        for name, languages in renderer.templates().items():
            for lang in languages:
                for suffix in (".subject.j2", ".txt.j2", ".html.j2"):
                    if (renderer.templates_dir / lang / f"{name}{suffix}").is_file():
                        renderer.env.get_template(f"{lang}/{name}{suffix}")

    def close(self) -> None:
        if self._crypto is not None:
            self._crypto.close()
            self._crypto = None
            self._sender = None

    # ---- waking

    def _arm(self, when: datetime) -> None:
        if self._scheduler is None:
            return
        self._armed_at = when
        self._scheduler.add_job(self._fire, trigger=DateTrigger(run_date=when, timezone=pytz.utc),
                                id=JOB_ID, replace_existing=True, misfire_grace_time=None,
                                coalesce=True, max_instances=2)

    async def _arm_next(self) -> None:
        now = utcnow()
        cap = now + timedelta(seconds=self.check_interval)
        try:
            due = await asyncio.to_thread(ledger.next_due, self.hub.engine)
        except Exception:
            log.exception("cannot read the next due step; looking again shortly")
            due, cap = None, now + timedelta(seconds=min(self.check_interval, 5.0))
        when = min(due, cap) if due is not None else cap
        self._arm(max(when, now + timedelta(milliseconds=50)))

    async def _fire(self) -> None:
        """The apscheduler job: run everything due, then arm the next wake-up."""
        assert self._lock is not None
        async with self._lock:
            if self._stopping:
                return
            try:
                await self.run_due_async()
            except Exception:
                log.exception("scheduler run failed; trying again at the next wake-up")
            await self._arm_next()

    def wake(self) -> None:
        """Look at the ledger now (thread-safe; e.g. right after an in-process reschedule)."""
        if self._loop is not None and self._scheduler is not None:
            self._loop.call_soon_threadsafe(self._arm, utcnow())

    def armed_job(self) -> Any:
        """The apscheduler job of the next wake-up (None when not serving): for diagnostics."""
        return self._scheduler.get_job(JOB_ID) if self._scheduler is not None else None

    async def _watch(self) -> None:
        """Re-arm when another process put a step before the armed wake-up, or when no wake-up
        is armed at all (a safety net: nothing should ever leave the dispatcher asleep)."""
        if self._lock is None or self._lock.locked():
            return
        if self.armed_job() is None:
            self._arm(utcnow())
            return
        try:
            due = await asyncio.to_thread(ledger.next_due, self.hub.engine)
        except Exception:
            log.warning("scheduler watch: the database did not answer", exc_info=True)
            return
        if due is not None and (self._armed_at is None or due < self._armed_at) \
                and not self._lock.locked():
            self._arm(due)

    async def run(self, stop: asyncio.Event) -> None:
        """The serving task (``Server.extra_tasks``): catch up at start, then wake on time."""
        self._loop = asyncio.get_running_loop()
        self._lock = asyncio.Lock()
        try:
            plans = await asyncio.to_thread(ledger.care_plans, self.hub)
            log.info("scheduler %s: %d care plan(s)", self.instance_id, len(plans))
        except MailhubError as exc:  # already-scheduled steps can still be sent
            log.error("care plans are invalid: %s", exc)
        try:
            await asyncio.to_thread(self._warm)
        except Exception:
            log.warning("scheduler warm-up failed; the first step will do it", exc_info=True)
        started = time.monotonic()
        try:
            await asyncio.to_thread(release_dead_claims, self.hub.engine,
                                    self.instance_id.split(":")[0], pid_alive)
        except Exception:
            log.warning("could not release claims of stopped processes", exc_info=True)
        self._scheduler = AsyncIOScheduler(event_loop=self._loop, timezone=pytz.utc)
        self._scheduler.start()
        await self._fire()  # start-up: everything that came due while we were down
        self.ready.set()
        log.info("scheduler ready in %.2fs; next wake-up %s", time.monotonic() - started,
                 self._armed_at.isoformat() if self._armed_at else "-")
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), timeout=self.poll_interval)
                except TimeoutError:
                    await self._watch()
        finally:
            self._stopping = True
            try:
                self._scheduler.remove_job(JOB_ID)
            except JobLookupError:
                pass
            async with self._lock:  # let a run in progress finish its steps
                self._scheduler.shutdown(wait=False)
                self._scheduler = None
            self.close()
