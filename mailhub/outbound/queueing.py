"""Writes outbound queue rows: sealed payloads, idempotent per (source, recipient), with notices.

Every caller (the submission pipeline, held-message release, the scheduler, DSNs) goes through
``QueueWriter`` so that the same rules hold everywhere: payloads sealed at rest, rows unique per
source id and recipient (a replay after a crash writes nothing twice), a notice to the sender for
each held recipient, and an audit entry for each decision.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP

from sqlmodel import Session

from mailhub.deliver import payloads, queue
from mailhub.deliver.fresh import FreshPayloads, remember
from mailhub.deliver.payload_files import PayloadFiles
from mailhub.outbound.notices import failure_dsn, hold_notice
from mailhub.store import audit

log = logging.getLogger("mailhub.queue")


@dataclass(frozen=True)
class RowSpec:
    recipient: str
    status: str  # queued | held
    method: str
    relay: str
    data: bytes = field(repr=False)  # a message (plaintext when held): never in logs
    reason: str = ""
    require_tls: bool = False
    trace: str = ""
    kind: str = "mail"


@dataclass(frozen=True)
class WriteJob:
    """One message's rows: what ``QueueWriter.write_many`` writes for it."""

    source_id: str
    message_id: str
    sender: str
    specs: list[RowSpec]
    case_id: str | None = None
    actor: str = "outbound"


def _action(spec: RowSpec) -> str:
    if spec.status == "held":
        return "held"
    return "encrypted" if spec.method in ("openpgp", "smime") else "queued"


class QueueWriter:
    def __init__(self, hub) -> None:  # type: ignore[no-untyped-def]
        self.hub = hub
        self.fresh: FreshPayloads | None = None  # the delivery worker's, when serving
        self.files: PayloadFiles | None = None  # large payloads' segment files, when serving

    def write(self, session: Session, *, source_id: str, message_id: str, sender: str,
              specs: list[RowSpec], case_id: str | None = None, actor: str = "outbound") -> int:
        """Insert rows that do not exist yet; returns how many were written."""
        return self.write_many(session, [WriteJob(source_id, message_id, sender, specs, case_id,
                                                  actor)])[0]

    def write_many(self, session: Session, jobs: list[WriteJob]) -> list[int]:
        """Rows, payloads and audit entries of several messages with a handful of statements
        (this runs for every recipient of every message); how many rows each job wrote."""
        existing = queue.existing_for_sources(session, (j.source_id for j in jobs))
        datas: list[bytes] = []
        shared: dict[int, int] = {}  # id(data) -> index in datas: recipients share a payload
        planned: list[tuple[WriteJob, RowSpec, int]] = []
        written = [0] * len(jobs)
        for n, job in enumerate(jobs):
            for spec in job.specs:
                if (job.source_id, spec.recipient) in existing:
                    continue
                existing.add((job.source_id, spec.recipient))
                if id(spec.data) not in shared:
                    shared[id(spec.data)] = len(datas)
                    datas.append(spec.data)
                planned.append((job, spec, shared[id(spec.data)]))
                written[n] += 1
        if not planned:
            return written
        pids = payloads.insert_payloads(session, datas, self.hub.sealer, self.files)
        row_ids = queue.insert_items(session, [queue.item_row(
            source_id=job.source_id, message_id=job.message_id, sender=job.sender,
            recipient=spec.recipient, status=spec.status, reason=spec.reason,
            method=spec.method, relay=spec.relay, kind=spec.kind, case_id=job.case_id,
            payload_id=pids[i], require_tls=spec.require_tls, trace=spec.trace)
            for job, spec, i in planned])
        audit.append_many(session, [audit.Pending(
            job.actor, _action(spec), message_id=job.message_id, case_id=job.case_id,
            detail={"recipient": spec.recipient, "method": spec.method, "queue_id": row_id,
                    "reason": spec.reason[:300]})
            for (job, spec, _), row_id in zip(planned, row_ids, strict=True)])
        if self.fresh is not None:  # the senders get these bytes in memory once committed
            remember(session.info, self.fresh, [
                (row_id, pids[i], datas[i])
                for (_, spec, i), row_id in zip(planned, row_ids, strict=True)
                if spec.status == "queued"])
        for (job, spec, _), row_id in zip(planned, row_ids, strict=True):
            if spec.status == "held" and spec.kind == "mail" and job.sender:
                self.notice(session, hold_notice(
                    from_addr=self.hub.config.hub.postmaster_address,
                    from_name=self.hub.config.hub.display_name, sender=job.sender,
                    recipient=spec.recipient, reason=spec.reason, queue_id=row_id,
                    original_id=job.message_id, domain=self.hub.domain),
                    source_id=f"{job.source_id}:held:{spec.recipient}", recipient=job.sender)
        return written

    def notice(self, session: Session, msg: EmailMessage, *, source_id: str, recipient: str,
               kind: str = "notice") -> None:
        """Queue a notice (no case content) to a sender, via the internal relay when it is ours."""
        cfg = self.hub.config
        internal = (recipient.rpartition("@")[2].lower() == cfg.hub.domain
                    and cfg.delivery.internal_relay is not None)
        spec = RowSpec(recipient=recipient, status="queued", method="plaintext",
                       relay="internal" if internal else "smarthost",
                       data=msg.as_bytes(policy=SMTP), kind=kind,
                       reason="notice to the sender (carries no message content)")
        self.write(session, source_id=source_id, message_id=str(msg["Message-ID"]), sender="",
                   specs=[spec], actor="notices")

    def dsn(self, session: Session, item: queue.Claimed, reply: str) -> None:
        if item.kind != "mail" or not item.sender:
            return  # never a DSN about a notice or a bounce (no loops)
        cfg = self.hub.config
        msg = failure_dsn(from_addr=cfg.hub.postmaster_address, from_name=cfg.hub.display_name,
                          sender=item.sender, recipient=item.recipient, reply=reply,
                          queue_id=item.id, original_id=item.message_id, domain=self.hub.domain,
                          reporting_mta=cfg.hub.domain, arrival=item.created_at)
        self.notice(session, msg, source_id=f"{item.source_id}:dsn:{item.recipient}",
                    recipient=item.sender, kind="dsn")
