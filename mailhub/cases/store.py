"""The case store: the SQL ``CaseIndex`` for threading, and storing one message in a case.

What is stored in the clear is only what threading and listings need: Message-IDs (as written
and as lookup keys), In-Reply-To/References (normalized, capped), addresses, sizes, digests,
protection and dates. The Subject, the whole message and attachment file names are sealed with
the at-rest key (AES-256-GCM, a data key per object inside ``AtRest``), each bound by its AAD
to the message's digest so a sealed blob cannot be moved to another row unnoticed.

Duplicates (the same message by SMTP and by IMAP, a redelivery) are stored once: the same raw
bytes (``digest``), or the same Message-ID with the same body (``body_digest``). A message
without a usable Message-ID gets one derived from its sender, date, subject and body, so a
redelivered copy gets the same id and is recognised too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from typing import Any

from sqlalchemy import and_, bindparam, func, or_, select
from sqlalchemy.orm import Session

from mailhub.crypto.protection import Protection
from mailhub.parse.checks import plain_header_block
from mailhub.parse.headers import addresses, normalize_address, raw_headers, safe_header
from mailhub.parse.msgid import dedupe_and_cap, normalize_msgid, parse_msgid_list
from mailhub.store.models import (
    Attachment,
    Case,
    MessageRef,
    Participant,
    Patient,
    StoredMessage,
    utcnow,
)

log = logging.getLogger("mailhub.cases")

MAX_SUBJECT_CHARS = 16 * 1024
"""A Subject is kept up to this many characters (sealed); longer ones are cut."""
MAX_KEY_BYTES = 400
"""Lookup keys longer than this (UTF-8) are replaced by a digest: index entries stay small."""
MAX_ATTACHMENTS = 500
MAX_RECIPIENTS = 500
_LINE_END = re.compile(rb"\r\n|\r")
_SPLIT = re.compile(rb"\r?\n\r?\n")
_INSERT_CHUNK = 400
_BLANK_LINE = re.compile(rb"\n[\r\n]|\r\r")
_BRACKETED = re.compile(r'<(?:"(?:[^"\\]|\\.)*"|[^<>"])*>')


def msgid_key(norm: str) -> str:
    """The indexed form of a normalized Message-ID (itself, or a digest when very long)."""
    data = norm.encode("utf-8", "surrogatepass")
    if len(data) <= MAX_KEY_BYTES:
        return norm
    return "#sha256:" + hashlib.sha256(data).hexdigest()


def raw_digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def body_digest(raw: bytes) -> str:
    """sha256 of the body (after the first empty line), line endings as LF, end trimmed."""
    parts = _SPLIT.split(raw, maxsplit=1)
    body = parts[1] if len(parts) == 2 else b""
    return hashlib.sha256(_LINE_END.sub(b"\n", body).rstrip(b"\r\n\t ")).hexdigest()


def parse_message(raw: bytes) -> Message:
    """The message as the stdlib reads it (compat32: lazy, tolerant of bad headers)."""
    return BytesParser(policy=compat32).parsebytes(raw)


def parse_headers(raw: bytes) -> Message:
    """The header section alone, parsed exactly as ``parse_message`` parses it (the payload is
    left out): enough to decide a message's case without reading a large body.

    Only a prefix is handed to the parser: up to the first empty line, which starts at the
    first ``LF LF``, ``LF CR`` or ``CR CR`` (a lone ``CR LF`` is one line end, never two);
    the headers end there at the latest, so the parser sees every header line it would see
    in the whole message."""
    found = _BLANK_LINE.search(raw)
    head = raw if found is None else raw[: found.end() + 1]
    if head.endswith(b"\r\n\r\n"):  # the usual case: ask the parser only when it is odd
        fast = plain_header_block(head[:-2])
        if fast is not None:
            fast.set_payload("")
            return fast
    return BytesParser(policy=compat32).parsebytes(head, headersonly=True)


def subject_aad(digest: str) -> bytes:
    return b"mailhub:subject:" + digest.encode()


def message_aad(digest: str) -> bytes:
    return b"mailhub:message:" + digest.encode()


def filename_aad(digest: str, position: int) -> bytes:
    return f"mailhub:attachment:{digest}:{position}".encode()


def _chunks(items: list[str], size: int = _INSERT_CHUNK) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _domain_matches(domain: str, wanted: set[str]) -> bool:
    labels = domain.split(".")
    return any(".".join(labels[i:]) in wanted for i in range(len(labels)))


# Built once: the index answers these for every message, and building a statement costs more
# than running it (SQLAlchemy caches the compiled form; the values are bound parameters).
_CASE_EXISTS = select(Case.id).where(Case.id == bindparam("cid"))  # type: ignore[arg-type]
_CASES_FOR_KEYS = (select(StoredMessage.message_id_norm, StoredMessage.case_id)
                   .where(StoredMessage.message_id_norm.in_(  # type: ignore[attr-defined]
                       bindparam("keys", expanding=True)))
                   .order_by(StoredMessage.id))  # type: ignore[arg-type]
_OPEN_CASES = (select(Case.id).join(Patient, Patient.id == Case.patient_id)  # type: ignore[arg-type]
               .where(Patient.email == bindparam("email"), Case.status != "closed",
                      Case.merged_into.is_(None))  # type: ignore[union-attr]
               .order_by(Case.created_at, Case.id))


class SqlCaseIndex:
    """``threading.CaseIndex`` over the case store, one indexed query per question."""

    def __init__(self, session: Session, hub_domain: str,
                 partner_domains: Iterable[str] = ()) -> None:
        self.session = session
        self.hub_domain = hub_domain.strip().rstrip(".").lower()
        self.partners = {d.strip().rstrip(".").lower() for d in partner_domains if d.strip()}

    def case_exists(self, case_id: str) -> bool:
        found = self.session.execute(_CASE_EXISTS, {"cid": case_id}).first()
        return found is not None

    def cases_for_message_ids(self, msgids: list[str]) -> dict[str, str]:
        """Normalized id -> case of the FIRST stored message (lowest pk) with that id."""
        by_key = {msgid_key(m): m for m in msgids}
        out: dict[str, str] = {}
        for chunk in _chunks(list(by_key)):
            for key, case_id in self.session.execute(_CASES_FOR_KEYS, {"keys": chunk}):
                out.setdefault(by_key[key], case_id)
        return out

    def cases_referencing(self, msgid: str) -> list[str]:
        stmt = (select(MessageRef.case_id, func.min(MessageRef.id))
                .where(MessageRef.ref_norm == msgid_key(msgid))
                .group_by(MessageRef.case_id).order_by(func.min(MessageRef.id)))
        return [row[0] for row in self.session.execute(stmt)]

    def open_cases_for_patient(self, address: str) -> list[str]:
        norm = normalize_address(address)
        if norm is None:
            return []
        return list(self.session.execute(_OPEN_CASES, {"email": norm}).scalars())

    def is_participant(self, case_id: str, address: str) -> bool:
        norm = normalize_address(address)
        if norm is None:
            return False
        stmt = select(Participant.id).where(Participant.case_id == case_id,
                                            Participant.address == norm)
        return self.session.execute(stmt).first() is not None

    def is_partner_address(self, address: str) -> bool:
        norm = normalize_address(address)
        return norm is not None and _domain_matches(norm.rpartition("@")[2], self.partners)

    def role_of(self, address: str, patient_email: str | None) -> str:
        """patient | coordinator (the hub's domain) | clinic (a partner) | other."""
        if patient_email and address == patient_email:
            return "patient"
        domain = address.rpartition("@")[2]
        if domain == self.hub_domain or domain.endswith("." + self.hub_domain):
            return "coordinator"
        return "clinic" if _domain_matches(domain, self.partners) else "other"


def insert_ignoring_conflicts(session: Session, table: Any, rows: list[dict[str, Any]],
                              returning: Any = None) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING`` (PostgreSQL and SQLite): a row some unique
    constraint already holds is skipped without aborting the transaction. The statement has
    no inline values, so SQLAlchemy compiles it once and caches it."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    stmt = insert(table).on_conflict_do_nothing()
    if returning is not None:
        stmt = stmt.returning(returning)
    return session.execute(stmt, rows[0] if len(rows) == 1 else rows)


def add_participants(session: Session, case_id: str, roles: dict[str, str]) -> int:
    """Add addresses (normalized -> role) not yet in the case; returns how many were added."""
    if not roles:
        return 0
    stmt = select(Participant.address).where(Participant.case_id == case_id,
                                             Participant.address.in_(list(roles)))  # type: ignore[attr-defined]
    known = set(session.execute(stmt).scalars())
    rows = [{"case_id": case_id, "address": a, "role": r} for a, r in roles.items()
            if a not in known]
    if not rows:
        return 0
    table = Participant.__table__  # type: ignore[attr-defined]
    result = insert_ignoring_conflicts(session, table, rows, returning=table.c.id)
    return len(result.all())


@dataclass(frozen=True)
class Identity:
    """The ids and digests that decide whether a message is already stored."""

    digest: str
    body_digest: str
    message_id: str  # as written (or assigned)
    norm: str
    key: str
    assigned: bool


def identify(msg: Message, raw: bytes, hub_domain: str) -> Identity:
    """Digests and Message-ID of ``raw``; one is assigned (deterministically) when missing."""
    digest, bdigest = raw_digest(raw), body_digest(raw)
    written = " ".join(raw_headers(msg, "Message-ID")).strip()
    ids = parse_msgid_list(written)
    if ids:
        shown = next((m.group(0) for m in _BRACKETED.finditer(written[:4096])
                      if normalize_msgid(m.group(0)) == ids[0]), ids[0])  # as written
        return Identity(digest, bdigest, shown, ids[0], msgid_key(ids[0]), False)
    seed = "\x00".join([*raw_headers(msg, "From")[:1], *raw_headers(msg, "Date")[:1],
                        *raw_headers(msg, "Subject")[:1], bdigest])
    token = hashlib.sha256(seed.encode("utf-8", "surrogateescape")).hexdigest()[:40]
    domain = hub_domain.strip().rstrip(".").lower() or "mailhub.invalid"
    assigned = f"<assigned.{token}@{domain}>"
    return Identity(digest, bdigest, assigned, assigned, msgid_key(assigned), True)


def find_duplicate(session: Session, ident: Identity) -> StoredMessage | None:
    """The stored copy of this message (same raw bytes, or same Message-ID and body), if any."""
    stmt = (select(StoredMessage.id)
            .where(or_(StoredMessage.digest == ident.digest,
                       and_(StoredMessage.message_id_norm == ident.key,
                            StoredMessage.body_digest == ident.body_digest)))
            .order_by(StoredMessage.id).limit(1))  # type: ignore[arg-type]
    pk = session.execute(stmt).scalar()
    return session.get(StoredMessage, pk) if pk is not None else None


def _attachments(msg: Message) -> list[tuple[str, str, bytes]]:
    """(filename, content type, decoded content) of each part that is an attachment."""
    out: list[tuple[str, str, bytes]] = []
    try:
        for part in msg.walk():
            if part.is_multipart():
                continue
            disposition = (part.get("Content-Disposition") or "").split(";")[0].strip().lower()
            try:
                name = part.get_filename() or ""
            except Exception:  # undecodable RFC 2231 parameters
                name = "attachment"
            if disposition != "attachment" and not name:
                continue
            payload = part.get_payload(decode=True)
            data = payload if isinstance(payload, bytes) else b""
            out.append((str(name)[:1000], part.get_content_type()[:200], data))
            if len(out) >= MAX_ATTACHMENTS:
                break
    except Exception as exc:  # a broken MIME tree: the message is still stored, whole
        log.warning("attachment scan stopped: %s", type(exc).__name__)
    return out


def _with_message_id(raw: bytes, ident: Identity) -> bytes:
    """The raw message with the assigned Message-ID prepended (when one was assigned)."""
    if not ident.assigned:
        return raw
    eol = b"\r\n" if b"\r\n" in raw[:4096] else b"\n"
    return b"Message-ID: " + ident.message_id.encode("utf-8") + eol + raw


def file_message(session: Session, sealer, *, raw: bytes, direction: str,  # type: ignore[no-untyped-def]
                 case_id: str, protection: Protection | None = None, thread_reason: str = "",
                 unverified_sender: bool = False, hub_domain: str = "mailhub.invalid",
                 index: SqlCaseIndex | None = None, patient_email: str | None = None,
                 envelope_from: str | None = None, envelope_to: Iterable[str] = (),
                 msg: Message | None = None, received_at: datetime | None = None,
                 ) -> StoredMessage | None:
    """Store ``raw`` in ``case_id``, sealed; None when it is already stored (a duplicate).

    The sender and recipients become participants of the case unless ``unverified_sender``.
    Runs in the caller's transaction (the caller commits). Rows are written with Core inserts
    (``ON CONFLICT DO NOTHING`` settles a race between two instances filing the same message);
    the returned ``StoredMessage`` is a snapshot with its ``id`` set, not attached to the session.
    """
    if direction not in ("in", "out"):
        raise ValueError(f"direction must be 'in' or 'out', not {direction!r}")
    msg = msg if msg is not None else parse_message(raw)
    ident = identify(msg, raw, hub_domain)  # a duplicate is refused by the insert below
    prot = protection or Protection("none", "none")
    sender = (addresses(msg, "From") or [normalize_address(envelope_from) or ""])[0]
    rcpts = addresses(msg, "To", "Cc") or [a for a in (normalize_address(r) for r in envelope_to)
                                           if a]
    rcpts = rcpts[:MAX_RECIPIENTS]
    refs = dedupe_and_cap(i for i in parse_msgid_list(" ".join(raw_headers(msg, "References")))
                          if i != ident.norm)
    irt = [i for i in parse_msgid_list(" ".join(raw_headers(msg, "In-Reply-To")))
           if i != ident.norm][:10]
    subject = safe_header(msg, "Subject", limit=MAX_SUBJECT_CHARS)
    row = StoredMessage(
        case_id=case_id, message_id=ident.message_id, message_id_norm=ident.key,
        message_id_assigned=ident.assigned, in_reply_to=" ".join(irt), references=" ".join(refs),
        direction=direction, from_addr=sender, to_addrs=json.dumps(rcpts, ensure_ascii=False),
        subject_sealed=sealer.seal(subject.encode("utf-8"), aad=subject_aad(ident.digest)),
        body_sealed=sealer.seal(_with_message_id(raw, ident), aad=message_aad(ident.digest)),
        encryption=prot.encryption, signature=prot.signature, signer=prot.signer or "",
        size=len(raw), digest=ident.digest, body_digest=ident.body_digest,
        unverified_sender=unverified_sender, thread_reason=thread_reason,
        received_at=received_at or utcnow(), sent_at=utcnow() if direction == "out" else None)
    table = StoredMessage.__table__  # type: ignore[attr-defined]
    values = {c.name: getattr(row, c.name) for c in table.columns if c.name != "id"}
    pk = insert_ignoring_conflicts(session, table, [values], returning=table.c.id).scalar()
    if pk is None:  # the same raw bytes, or the same Message-ID and body, are stored already
        log.info("message already stored; not stored twice")
        return None
    row.id = int(pk)
    ref_keys = list(dict.fromkeys(msgid_key(i) for i in [*refs, *irt]))
    if ref_keys:
        session.execute(MessageRef.__table__.insert(),  # type: ignore[attr-defined]
                        [{"message_pk": pk, "case_id": case_id, "ref_norm": k} for k in ref_keys])
    attachments = [{"message_pk": pk, "position": pos, "content_type": ctype, "size": len(data),
                    "digest": hashlib.sha256(data).hexdigest(),
                    "filename_sealed": sealer.seal(name.encode("utf-8", "replace"),
                                                   aad=filename_aad(ident.digest, pos))}
                   for pos, (name, ctype, data) in enumerate(_attachments(msg))]
    if attachments:
        session.execute(Attachment.__table__.insert(), attachments)  # type: ignore[attr-defined]
    if not unverified_sender:
        idx = index or SqlCaseIndex(session, hub_domain)
        roles = {a: idx.role_of(a, patient_email) for a in [sender, *rcpts]
                 if a and not a.lower().startswith(("case+", '"case+'))}
        add_participants(session, case_id, roles)
    return row


def open_subject(sealer, row: StoredMessage) -> str:  # type: ignore[no-untyped-def]
    """The decrypted Subject of a stored message."""
    if not row.subject_sealed:
        return ""
    return sealer.open(row.subject_sealed, aad=subject_aad(row.digest)).decode("utf-8", "replace")


def open_message(sealer, row: StoredMessage) -> bytes:  # type: ignore[no-untyped-def]
    """The decrypted whole message (as received; an assigned Message-ID prepended)."""
    if not row.body_sealed:
        return b""
    return sealer.open(row.body_sealed, aad=message_aad(row.digest))


def open_filename(sealer, row: StoredMessage, attachment: Attachment) -> str:  # type: ignore[no-untyped-def]
    return sealer.open(attachment.filename_sealed,
                       aad=filename_aad(row.digest, attachment.position)).decode("utf-8", "replace")
