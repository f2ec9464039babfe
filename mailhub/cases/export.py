"""Reading case files out: ``cases list``, ``cases show`` and ``cases export``.

``show`` decrypts only the Subjects (sealed apart from the messages for this reason) and orders
the messages as threads (JWZ, ``jwz.display_order``), oldest first. ``export`` writes the
decrypted case file (an mbox, or a zip of .eml files plus ``case.json``) to a file the user
names: created 0600, never over an existing file, and plaintext by design, so the CLI warns.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, defer

from mailhub.cases.jwz import ThreadMessage, display_order
from mailhub.cases.service import EVENTS, STATUSES, CaseInputError, get_case, patient_of
from mailhub.cases.store import open_filename, open_message, open_subject
from mailhub.cases.subjects import strip_reply_prefixes
from mailhub.errors import MailhubError
from mailhub.fileaccess import user_paths
from mailhub.scheduler.timecalc import local_iso
from mailhub.store.models import (
    Attachment,
    Case,
    Participant,
    Patient,
    ScheduleEntry,
    StoredMessage,
)

FORMATS = ("mbox", "zip")
_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC).isoformat()


def _like(text: str) -> str:
    escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def list_cases(session: Session, *, status: str | None = None, clinic: str | None = None,
               text: str | None = None) -> list[dict[str, Any]]:
    """Cases (newest first) with their message counts; filters by status, clinic and text
    (in the id, the patient's name and address, procedure, clinic, coordinator)."""
    if status is not None and status not in STATUSES:
        raise CaseInputError(f"status {status!r} is not one of {', '.join(STATUSES)}")
    counts = (select(StoredMessage.case_id, func.count().label("n"))
              .group_by(StoredMessage.case_id).subquery())
    stmt = (select(Case, Patient.name, Patient.email, counts.c.n)
            .outerjoin(Patient, Patient.id == Case.patient_id)  # type: ignore[arg-type]
            .outerjoin(counts, counts.c.case_id == Case.id)
            .order_by(Case.created_at.desc(), Case.id.desc()))  # type: ignore[attr-defined]
    if status:
        stmt = stmt.where(Case.status == status)
    if clinic:
        stmt = stmt.where(func.lower(Case.clinic) == clinic.strip().lower())
    if text and text.strip():
        pattern = _like(text.strip())
        stmt = stmt.where(or_(*(func.lower(col).like(pattern, escape="\\") for col in (
            Case.id, Patient.name, Patient.email, Case.procedure, Case.clinic,
            Case.coordinator))))
    return [{"id": case.id, "patient_email": email or "", "patient_name": name or "",
             "status": case.status, "message_count": int(n or 0), "procedure": case.procedure,
             "clinic": case.clinic, "coordinator": case.coordinator,
             "merged_into": case.merged_into, "created_at": _iso(case.created_at),
             "updated_at": _iso(case.updated_at)}
            for case, name, email, n in session.execute(stmt)]


def schedule_rows(session: Session, case_id: str) -> list[dict[str, Any]]:
    """The case's scheduled messages, shaped like ``schedule list`` rows."""
    stmt = (select(ScheduleEntry).where(ScheduleEntry.case_id == case_id)
            .order_by(ScheduleEntry.send_at_utc, ScheduleEntry.step))  # type: ignore[arg-type]
    rows = []
    for e in session.execute(stmt).scalars():
        try:
            local = local_iso(e.send_at_utc, e.timezone)
        except (MailhubError, ValueError):
            local = None
        rows.append({"case": e.case_id, "step": e.step, "template": e.template,
                     "send_at_utc": _iso(e.send_at_utc), "send_at_local": local,
                     "timezone": e.timezone, "status": e.status, "reason": e.reason})
    return rows


def _ids(text: str) -> list[str]:
    return [i for i in text.split() if i]


def message_rows(session: Session, sealer: Any, case_id: str) -> list[dict[str, Any]]:
    """The case's messages in thread order, Subjects decrypted, reply prefixes stripped."""
    stmt = (select(StoredMessage).options(defer(StoredMessage.body_sealed))  # type: ignore[arg-type]
            .where(StoredMessage.case_id == case_id)
            .order_by(StoredMessage.received_at, StoredMessage.id))  # type: ignore[arg-type]
    rows = list(session.execute(stmt).scalars())
    attachments: dict[int, list[Attachment]] = {}
    astmt = (select(Attachment).join(StoredMessage, StoredMessage.id == Attachment.message_pk)  # type: ignore[arg-type]
             .where(StoredMessage.case_id == case_id).order_by(Attachment.position))
    for a in session.execute(astmt).scalars():
        attachments.setdefault(a.message_pk, []).append(a)
    subjects = {r.id: open_subject(sealer, r) for r in rows}
    by_pk = {str(r.id): r for r in rows}
    order = display_order(ThreadMessage(
        id=str(r.id), message_id=None if r.message_id_norm.startswith("#") else r.message_id_norm,
        in_reply_to=_ids(r.in_reply_to), references=_ids(r.references),
        subject=subjects[r.id], date=r.received_at) for r in rows)
    seen = {pk for pk, _ in order}
    order += [(str(r.id), 0) for r in rows if str(r.id) not in seen]
    out = []
    for pk, depth in order:
        r = by_pk[pk]
        out.append({
            "message_id": r.message_id, "direction": r.direction, "from": r.from_addr,
            "to": json.loads(r.to_addrs or "[]"), "subject": strip_reply_prefixes(subjects[r.id]),
            "encryption": r.encryption, "signature": r.signature, "signer": r.signer or None,
            "received_at": _iso(r.received_at), "size": r.size, "depth": depth,
            "unverified_sender": r.unverified_sender, "thread_reason": r.thread_reason,
            "attachments": [{"filename": open_filename(sealer, r, a), "content_type":
                             a.content_type, "size": a.size} for a in attachments.get(r.id, [])],
        })
    return out


def show_case(session: Session, sealer: Any, case_id: str) -> dict[str, Any]:
    """``cases show``: the case, its participants, its messages and its schedule."""
    case = get_case(session, case_id)
    patient = patient_of(session, case)
    events = {e: {"at_utc": _iso(getattr(case, f"{e}_at")), "local": getattr(case, f"{e}_local")
                  or None, "timezone": getattr(case, f"{e}_tz") or None} for e in EVENTS}
    parts = session.execute(select(Participant).where(Participant.case_id == case.id)
                            .order_by(Participant.id)).scalars()  # type: ignore[arg-type]
    return {
        "id": case.id, "patient_name": patient.name, "patient_email": patient.email,
        "timezone": patient.timezone, "language": patient.language, "status": case.status,
        "procedure": case.procedure, "clinic": case.clinic, "coordinator": case.coordinator,
        "merged_into": case.merged_into, "consent_plain_email": case.consent_plain_email,
        "consent_by": case.consent_by or None, "consent_at": _iso(case.consent_at),
        "created_at": _iso(case.created_at), "updated_at": _iso(case.updated_at),
        "events": events,
        "participants": [{"address": p.address, "role": p.role} for p in parts],
        "messages": message_rows(session, sealer, case.id),
        "schedule": schedule_rows(session, case.id),
    }


@dataclass(frozen=True)
class ExportResult:
    case_id: str
    path: Path
    messages: int
    size: int


def _stored(session: Session, case_id: str) -> Iterator[StoredMessage]:
    stmt = (select(StoredMessage).where(StoredMessage.case_id == case_id)
            .order_by(StoredMessage.received_at, StoredMessage.id))  # type: ignore[arg-type]
    yield from session.execute(stmt.execution_options(yield_per=100)).scalars()


def _mbox_entry(row: StoredMessage, data: bytes) -> bytes:
    """One mboxrd entry: a ``From `` line, the message with LF endings and ``>From`` quoting."""
    sender = row.from_addr if row.from_addr and " " not in row.from_addr else "MAILER-DAEMON"
    when = (row.received_at or datetime.now(UTC)).astimezone(UTC).strftime("%a %b %d %H:%M:%S %Y")
    body = data.replace(b"\r\n", b"\n")
    body = _FROM_LINE.sub(rb">\1", body)
    if not body.endswith(b"\n"):
        body += b"\n"
    return f"From {sender} {when}\n".encode() + body + b"\n"


def _write_mbox(out: IO[bytes], session: Session, sealer: Any, case_id: str) -> int:
    count = 0
    for row in _stored(session, case_id):
        out.write(_mbox_entry(row, open_message(sealer, row)))
        count += 1
    return count


def _write_zip(out: IO[bytes], session: Session, sealer: Any, case_id: str) -> int:
    count = 0
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for row in _stored(session, case_id):
            count += 1
            zf.writestr(f"messages/{count:05d}-{row.direction}.eml", open_message(sealer, row))
        view = show_case(session, sealer, case_id)
        zf.writestr("case.json", json.dumps(view, indent=2, ensure_ascii=False))
    return count


def export_case(session: Session, sealer: Any, case_id: str, output: Path | str,
                fmt: str = "mbox") -> ExportResult:
    """Write the decrypted case file to ``output`` (0600; refuses to replace a file)."""
    if fmt not in FORMATS:
        raise CaseInputError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    case = get_case(session, case_id)
    target = Path(output)
    if target.exists() or target.is_symlink():
        raise CaseInputError(f"{target} already exists; not replacing it",
                             hint="name a new file, or move the old one away first")
    if not target.parent.is_dir():
        raise CaseInputError(f"folder {target.parent} does not exist")
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.part")
    with user_paths("write", target, CaseInputError):  # no write access, full disk: one line
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                os.fchmod(out.fileno(), 0o600)  # exactly 0600 whatever the umask
                writer = _write_mbox if fmt == "mbox" else _write_zip
                count = writer(out, session, sealer, case.id)
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(tmp, target)  # never replaces a file created meanwhile
            except FileExistsError as exc:
                raise CaseInputError(f"{target} already exists; not replacing it") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return ExportResult(case.id, target, count, target.stat().st_size)
