"""Sends one claimed care-plan step through the same outbound path as a coordinator's mail.

The step is rendered in the patient's language and zone, built into MIME (From: the case's
coordinator, or hub@<domain>; To: the patient; ``[ID]`` in the Subject) and written into the
spool under listener "scheduler" with a spool id derived from the ledger row (``sched-<id>``).
The ledger row records that spool id in the same transaction, under the row's lock, so:
- a reschedule that runs at the same moment either sees the step as handed over (and leaves it)
  or moves it before it is spooled (and the send is called off);
- a crash anywhere re-sends nothing twice: the outbound queue rows are unique per (spool id,
  recipient), and a retried step re-uses its spool id and Message-ID.
The outbound pipeline then decides encrypt/plaintext/hold for the patient exactly as for any
submission; the ledger row ends ``sent``, or ``held`` when the policy held the patient's copy.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, formataddr, make_msgid, parseaddr
from typing import Any, Literal

from sqlmodel import Session, select

from mailhub.errors import MailhubError
from mailhub.outbound.queueing import QueueWriter
from mailhub.outbound.render import TemplateRenderer, build_mime
from mailhub.scheduler import ledger
from mailhub.scheduler.ledger import Claim
from mailhub.scheduler.timecalc import get_zone
from mailhub.spool.spool import Envelope
from mailhub.store import audit
from mailhub.store.models import (
    Case,
    OutboundItem,
    Participant,
    Patient,
    ScheduleEntry,
    utcnow,
)

log = logging.getLogger("mailhub.scheduler")

LISTENER = "scheduler"
Processor = Callable[[str, str], Awaitable[None]]
Status = Literal["sent", "held", "missed", "skipped", "pending"]


def spool_id_for(entry_id: int) -> str:
    """The spool id (and outbound ``source_id``) of a ledger row: the same on every retry."""
    return f"sched-{entry_id}"


def message_id_for(case_id: str, step: str, entry_id: int, domain: str) -> str:
    """A stable Message-ID that names neither the case nor the step (it travels in clear)."""
    digest = hashlib.sha256(f"{case_id}\0{step}\0{entry_id}".encode()).hexdigest()[:20]
    return f"<sched-{digest}@{domain}>"


@dataclass(frozen=True)
class Outcome:
    """What happened to one claimed step (``pending``: handed over, result not known yet)."""

    entry_id: int
    case_id: str
    step: str
    status: Status
    reason: str = ""
    source_id: str = ""


@dataclass(frozen=True)
class StepMessage:
    mail_from: str
    rcpt: str
    raw: bytes = field(repr=False)  # the rendered care mail: never in logs or tracebacks
    message_id: str
    template_version: str
    language: str


def _in_zone(value: datetime | None, tz: str) -> datetime | None:
    return None if value is None else value.astimezone(UTC).astimezone(get_zone(tz))


def render_context(case: Case, patient: Patient, coordinator: str, send_at: datetime,
                   timezone: str) -> dict[str, Any]:
    """The documented template variables (templates/README.md) for one case and step."""
    home = patient.timezone or "UTC"
    clinic = case.procedure_tz or home
    return {
        "patient_name": patient.name, "case_id": case.id, "clinic": case.clinic,
        "procedure": case.procedure,
        "procedure_at": _in_zone(case.procedure_at, clinic),
        "discharge_at": _in_zone(case.discharge_at, case.discharge_tz or clinic),
        "return_home_at": _in_zone(case.return_home_at, case.return_home_tz or home),
        "send_at": _in_zone(send_at, timezone), "timezone": timezone,
        "coordinator": coordinator,
    }


def coordinator_address(session: Session, case: Case) -> tuple[str, str]:
    """(display name, address) of the case's coordinator; address "" when none is known."""
    name, addr = parseaddr(case.coordinator or "")
    if "@" not in addr:
        name = name or (case.coordinator or "").strip()
        part = session.scalars(select(Participant).where(
            Participant.case_id == case.id, Participant.role == "coordinator")).first()
        addr = part.address if part is not None else ""
    return name, addr.strip()


def step_notice(*, hub: Any, to_addr: str, case_id: str, step: str, what: str,
                reason: str, todo: str) -> EmailMessage:
    """A notice to the coordinator about a step: case id and step name only, no content."""
    cfg = hub.config.hub
    msg = EmailMessage()
    msg["From"] = formataddr((cfg.display_name, cfg.postmaster_address))
    msg["To"] = to_addr
    msg["Subject"] = f"Care-plan step {what}: [{case_id}] {step}"
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = make_msgid(domain=cfg.domain)
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(f"The scheduled care-plan message '{step}' of case {case_id} was {what}.\n\n"
                    f"Reason: {reason}\n\nWhat to do: {todo}\n\n"
                    "This notice contains none of the message's content.\n")
    return msg


class StepSender:
    """Renders, spools and records claimed steps. Blocking methods run in threads."""

    def __init__(self, hub: Any, process: Processor, *, renderer: TemplateRenderer | None = None,
                 on_queued: Callable[[], None] | None = None) -> None:
        self.hub = hub
        self.process = process
        self.renderer = renderer or TemplateRenderer(hub.config.hub.templates_dir)
        self.writer = QueueWriter(hub)
        self.on_queued = on_queued

    # ---- building the message

    def build(self, claim: Claim) -> StepMessage:
        """Render the step for its patient; TemplateError/SchedulingError say what is wrong."""
        with Session(self.hub.engine) as session:
            case = session.get(Case, claim.case_id)
            if case is None:
                raise ledger.SchedulingError(f"case {claim.case_id} no longer exists")
            patient = session.get(Patient, case.patient_id) if case.patient_id else None
            if patient is None or "@" not in (patient.email or ""):
                raise ledger.SchedulingError(f"case {claim.case_id} has no patient address")
            name, coord = coordinator_address(session, case)
        domain = self.hub.config.hub.domain
        mail_from = coord or f"hub@{domain}"
        ctx = render_context(case, patient, name, claim.send_at_utc, claim.timezone)
        rendered = self.renderer.render(claim.template, patient.language, ctx)
        message_id = message_id_for(claim.case_id, claim.step, claim.id, domain)
        msg = build_mime(rendered, formataddr((name, mail_from)) if name else mail_from,
                         formataddr((patient.name, patient.email)), case_id=claim.case_id,
                         message_id=message_id, sent_at=utcnow())
        return StepMessage(mail_from, patient.email, msg.as_bytes(policy=SMTP), message_id,
                           rendered.version, rendered.language_used)

    # ---- ledger transitions

    def spool(self, claim: Claim, msg: StepMessage, now: datetime) -> str | None:
        """Spool the message and note its spool id on the row, under the row's lock.

        None when the row is no longer ours to send (rescheduled, cancelled, taken over).
        """
        sid = spool_id_for(claim.id)
        with Session(self.hub.engine) as session:
            row = ledger.lock_claimed(session, claim)
            if row is None or row.queue_source_id not in ("", sid):
                session.rollback()
                return None
            if not row.queue_source_id and row.send_at_utc > now:
                session.rollback()
                ledger.release(self.hub.engine, claim)
                return None
            env = Envelope(mail_from=msg.mail_from, rcpt_tos=[msg.rcpt], listener=LISTENER,
                           auth_user="scheduler", extra={"case_id": claim.case_id,
                                                         "schedule_id": str(claim.id),
                                                         "step": claim.step})
            self.hub.spool.accept(env, msg.raw, spool_id=sid)
            row.queue_source_id, row.template_version = sid, msg.template_version
            row.updated_at = utcnow()
            session.add(row)
            audit.append(session, "scheduler", "queued", message_id=msg.message_id,
                         case_id=claim.case_id, detail={
                             "step": claim.step, "schedule_id": claim.id, "source_id": sid,
                             "template": claim.template, "language": msg.language,
                             "template_version": msg.template_version})
            session.commit()
        return sid

    def queue_rows(self, sid: str) -> list[OutboundItem]:
        with Session(self.hub.engine) as session:
            return list(session.scalars(select(OutboundItem).where(
                OutboundItem.source_id == sid, OutboundItem.kind == "mail")))

    def record(self, claim: Claim, sid: str) -> Outcome:
        """Mark the row sent or held from what the outbound path made of the message."""
        rows = self.queue_rows(sid)
        if not rows:
            return Outcome(claim.id, claim.case_id, claim.step, "pending",
                           "handed to the outbound path; not processed yet", sid)
        held = [r for r in rows if r.status == "held"]
        status: Status = "held" if held else "sent"
        reason = held[0].reason if held else ""
        with Session(self.hub.engine) as session:
            row = session.get(ScheduleEntry, claim.id, with_for_update=True)
            if row is not None and row.status == "pending" and row.queue_source_id == sid:
                row.status, row.reason, row.sent_at = status, reason[:500], utcnow()
                row.claimed_by, row.claimed_at, row.updated_at = "", None, utcnow()
                session.add(row)
            session.commit()
        log.info("case %s step %s: %s (source %s)", claim.case_id, claim.step, status, sid)
        return Outcome(claim.id, claim.case_id, claim.step, status, reason, sid)

    def _close(self, claim: Claim, status: Literal["held", "missed"], reason: str,
               what: str, todo: str) -> Outcome:
        """End a step without sending it, and tell the coordinator (one notice per row)."""
        with Session(self.hub.engine) as session:
            row = ledger.lock_claimed(session, claim)
            if row is None or row.queue_source_id:
                session.rollback()
                return Outcome(claim.id, claim.case_id, claim.step, "skipped",
                               "no longer ours to close")
            row.status, row.reason, row.updated_at = status, reason[:500], utcnow()
            row.claimed_by, row.claimed_at = "", None
            session.add(row)
            case = session.get(Case, claim.case_id)
            addr = (coordinator_address(session, case)[1] if case else "") or \
                self.hub.config.hub.postmaster_address
            notice = step_notice(hub=self.hub, to_addr=addr, case_id=claim.case_id,
                                 step=claim.step, what=what, reason=reason, todo=todo)
            self.writer.notice(session, notice, source_id=f"{spool_id_for(claim.id)}:{status}",
                               recipient=addr)
            audit.append(session, "scheduler", status, case_id=claim.case_id,
                         detail={"step": claim.step, "schedule_id": claim.id,
                                 "reason": reason[:300]})
            session.commit()
        log.warning("case %s step %s: %s: %s", claim.case_id, claim.step, status, reason)
        if self.on_queued:
            self.on_queued()
        return Outcome(claim.id, claim.case_id, claim.step, status, reason)

    def miss(self, claim: Claim) -> Outcome:
        until = claim.valid_until_utc.isoformat() if claim.valid_until_utc else "?"
        return self._close(
            claim, "missed", f"its send window closed at {until} before it could be sent",
            "not sent (missed)",
            "contact the patient another way if the information is still needed")

    def hold(self, claim: Claim, reason: str) -> Outcome:
        return self._close(
            claim, "held", reason, "held",
            "fix the problem named above, then change the case (e.g. 'mailhub cases set "
            f"{claim.case_id} ...') so its schedule is recomputed and the step retried")

    # ---- one step, start to end

    async def send(self, claim: Claim, now: datetime) -> Outcome:
        """Handle one claimed step; exceptions other than MailhubError leave the claim to expire."""
        if claim.action == "missed":
            return await asyncio.to_thread(self.miss, claim)
        sid = spool_id_for(claim.id)
        if await asyncio.to_thread(self.queue_rows, sid):
            return await asyncio.to_thread(self.record, claim, sid)  # spooled and processed
        local = await asyncio.to_thread(self.hub.spool.contains, LISTENER, sid)
        if not (claim.action == "finish" and local):
            try:
                msg = await asyncio.to_thread(self.build, claim)
            except MailhubError as exc:  # template, zone or case data: held, with the reason
                return await asyncio.to_thread(self.hold, claim, str(exc))
            spooled = await asyncio.to_thread(self.spool, claim, msg, now)
            if spooled is None:
                return Outcome(claim.id, claim.case_id, claim.step, "skipped",
                               "rescheduled, cancelled or taken over meanwhile")
        try:
            await self.process(LISTENER, sid)
        except FileNotFoundError:
            pass  # processed meanwhile (the spool runner's start-up recovery)
        except MailhubError as exc:
            log.warning("case %s step %s: outbound processing failed (%s); retried later",
                        claim.case_id, claim.step, exc)
        return await asyncio.to_thread(self.record, claim, sid)
