"""Filing every message the hub handles into its case: the entry points the hub calls.

``file_inbound`` (SMTP inbound listener, IMAP watcher) threads a decrypted message with
``threading.assign_case`` over the SQL index and stores it; no match opens a new ``inquiry``
case for the sender. ``file_outbound`` (submission pipeline) finds the case of a coordinator's
message and stores it; the caller then puts ``[ID]`` into the protected Subject. Both run in the
caller's session and transaction, do no network I/O, and record a ``filed`` audit entry. A
message already stored (the same message by SMTP and IMAP, a redelivery) is not stored again:
the result names the case it is in, with ``duplicate=True``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from email.message import Message
from email.utils import getaddresses
from typing import Any

from sqlalchemy.orm import Session

from mailhub.cases.prefetch import PrefetchedIndex
from mailhub.cases.service import case_patient, create_case, resolve_merged
from mailhub.cases.store import (
    SqlCaseIndex,
    file_message,
    find_duplicate,
    identify,
    parse_headers,
    parse_message,
)
from mailhub.cases.subjects import find_case_tags
from mailhub.cases.threading import Incoming, assign_case, case_address_id, incoming_from_message
from mailhub.crypto.protection import Protection
from mailhub.errors import StoreError
from mailhub.parse.headers import (
    addresses,
    decode_words,
    normalize_address,
    raw_headers,
    safe_header,
)
from mailhub.parse.msgid import parse_msgid_list
from mailhub.store import audit

log = logging.getLogger("mailhub.cases")

NO_PROTECTION = Protection("none", "none")


@dataclass(frozen=True)
class FiledResult:
    """Where an inbound message was filed (``duplicate``: it was already stored there)."""

    case_id: str
    patient_name: str
    message_pk: int
    created_case: bool
    unverified: bool
    duplicate: bool = False
    reason: str = ""


def partner_domains(hub: Any) -> list[str]:
    """Domains of the partner clinics in the hub's current policy."""
    return [p.domain for p in hub.policy_cache.current().partners]


def display_name(msg: Message, fallback: str) -> str:
    """The From display name (decoded, one line, at most 200 characters), else ``fallback``."""
    for value in raw_headers(msg, "From")[:1]:
        try:
            pairs = getaddresses([value])
        except Exception:
            pairs = []
        for name, _ in pairs:
            text = " ".join(decode_words(name).split()).strip(" \"'")
            if text:
                return text[:200]
    return fallback


class _AlreadyStored(Exception):
    """Internal: the message turned out to be stored already (rolls back a new case)."""


def _patient_name(session: Session, case_id: str) -> str:
    return case_patient(session, case_id).name


def file_inbound(session: Session, hub: Any, raw: bytes, protection: Protection | None = None,
                 *, envelope_from: str | None = None, recipients: Iterable[str] = (),
                 actor: str = "inbound") -> FiledResult:
    """Thread and store one inbound (already decrypted) message; opens a case when needed."""
    msg = parse_message(raw)
    ident = identify(msg, raw, hub.domain)
    existing = find_duplicate(session, ident)
    if existing is not None:
        log.info("inbound message already stored in %s; not filed twice", existing.case_id)
        return FiledResult(existing.case_id, _patient_name(session, existing.case_id),
                           int(existing.id or 0), False, existing.unverified_sender, True,
                           "duplicate")
    rcpts = list(recipients)
    index = SqlCaseIndex(session, hub.domain, partner_domains(hub))
    incoming = incoming_from_message(msg, hub.domain, rcpts, envelope_from)
    if ident.assigned:
        incoming = Incoming(ident.norm, incoming.in_reply_to, incoming.references,
                            incoming.subject, incoming.from_addr, incoming.to_addrs,
                            incoming.hub_domain)
    decision = assign_case(incoming, index)
    created = decision.case_id is None
    store = {"raw": raw, "direction": "in", "protection": protection or NO_PROTECTION,
             "thread_reason": decision.reason, "unverified_sender": decision.unverified_sender,
             "hub_domain": hub.domain, "index": index, "envelope_from": envelope_from,
             "envelope_to": rcpts, "msg": msg}
    row = None
    if created:
        # in a savepoint: if another instance stores the same message first, the new case
        # opened for it here is rolled back instead of being left empty
        sender = incoming.from_addr
        name = display_name(msg, sender.partition("@")[0] or "unknown sender")
        try:
            with session.begin_nested():
                case = create_case(session, patient_name=name, patient_email=sender,
                                   actor=actor, why="first contact")
                row = file_message(session, hub.sealer, case_id=case.id,
                                   patient_email=case_patient(session, case.id).email, **store)
                if row is None:
                    raise _AlreadyStored
            case_id = case.id
        except _AlreadyStored:
            row = None
    else:
        case_id = resolve_merged(session, decision.case_id or "")
        row = file_message(session, hub.sealer, case_id=case_id,
                           patient_email=case_patient(session, case_id).email, **store)
    if row is None:  # stored meanwhile by a concurrent copy
        again = find_duplicate(session, ident)
        if again is None:
            raise StoreError("the message was neither stored nor found as a duplicate",
                             hint="retry; check the database's health")
        return FiledResult(again.case_id, _patient_name(session, again.case_id),
                           int(again.id or 0), False, again.unverified_sender, True, "duplicate")
    patient = case_patient(session, case_id)
    prot = protection or NO_PROTECTION
    audit.append(session, actor, "filed", message_id=row.message_id, case_id=case_id,
                 detail={"direction": "in", "reason": decision.reason,
                         "unverified_sender": decision.unverified_sender,
                         "encryption": prot.encryption, "signature": prot.signature,
                         "message_id_assigned": ident.assigned})
    log.info("filed inbound message in %s (%s%s)", case_id, decision.reason,
             ", unverified sender" if decision.unverified_sender else "")
    return FiledResult(case_id, patient.name, int(row.id or 0), created,
                       decision.unverified_sender, False, decision.reason)


def outbound_case(index: SqlCaseIndex | PrefetchedIndex, subject: str, recipients: list[str],
                  references: list[str], in_reply_to: list[str]) -> tuple[str | None, str]:
    """The case a coordinator's message belongs to, and why: a ``[ID]`` tag, a ``case+ID@``
    recipient, a known References/In-Reply-To id (last References entry first), or a
    recipient who is the patient of exactly one open case. (None, "") when none applies."""
    for cid in find_case_tags(subject):
        if index.case_exists(cid):
            return cid, "subject-tag"
    for rcpt in recipients:
        cid = case_address_id(rcpt, index.hub_domain)
        if cid and index.case_exists(cid):
            return cid, "case-address"
    known = index.cases_for_message_ids(list(dict.fromkeys([*references, *in_reply_to])))
    for mid in reversed(references):
        if mid in known:
            return known[mid], "references"
    for mid in in_reply_to:
        if mid in known:
            return known[mid], "in-reply-to"
    found: set[str] = set()
    for rcpt in recipients:
        cases = index.open_cases_for_patient(rcpt)
        if len(cases) == 1:
            found.add(cases[0])
    if len(found) == 1:
        return found.pop(), "patient-open-case"
    return None, ""


@dataclass(frozen=True)
class OutboundItem:
    """One coordinator message to file (``file_outbound_many``)."""

    raw: bytes
    sender: str
    recipients: list[str]
    protection: Protection | None = None
    headers: Message | None = None  # parse_headers(raw), when the caller has it already
    to_cc: list[str] | None = None  # addresses(headers, "To", "Cc"), likewise


@dataclass(frozen=True)
class _Heads:
    recipients: list[str]
    references: list[str]
    in_reply_to: list[str]
    subject: str


def _outbound_heads(item: OutboundItem) -> _Heads:
    """What decides an outbound message's case, from its header section alone."""
    msg = item.headers if item.headers is not None else parse_headers(item.raw)
    to_cc = item.to_cc if item.to_cc is not None else addresses(msg, "To", "Cc")
    rcpts = [a for a in (normalize_address(r) for r in item.recipients) if a]
    rcpts += [a for a in to_cc if a not in rcpts]
    refs = parse_msgid_list(" ".join(raw_headers(msg, "References")))
    irt = parse_msgid_list(" ".join(raw_headers(msg, "In-Reply-To")))
    return _Heads(rcpts, refs, irt, safe_header(msg, "Subject"))


def file_outbound_many(session: Session, hub: Any, items: list[OutboundItem], *,
                       actor: str = "outbound") -> list[str | None]:
    """Store a batch of coordinators' messages; each one's case id, or None (not case mail).

    The cases are decided from the headers alone with three queries for the whole batch (most
    submissions are not case mail): a body is parsed only for a message that is stored."""
    heads = [_outbound_heads(item) for item in items]
    index = PrefetchedIndex(
        session, hub.domain,
        case_ids=[c for h in heads for c in (*find_case_tags(h.subject), *(
            cid for cid in (case_address_id(r, hub.domain) for r in h.recipients) if cid))],
        message_ids=[m for h in heads for m in (*h.references, *h.in_reply_to)],
        emails=[r for h in heads for r in h.recipients])
    out: list[str | None] = []
    for item, h in zip(items, heads, strict=True):
        case_id, reason = outbound_case(index, h.subject, h.recipients, h.references,
                                        h.in_reply_to)
        if case_id is None:
            out.append(None)
            continue
        case_id, key = _store_outbound(session, hub, item, h, case_id, reason, actor)
        if key:
            index.learn(key, case_id)
        out.append(case_id)
    return out


def _store_outbound(session: Session, hub: Any, item: OutboundItem, heads: _Heads,
                    case_id: str, reason: str, actor: str) -> tuple[str, str | None]:
    case_id = resolve_merged(session, case_id)
    patient = case_patient(session, case_id)
    prot = item.protection or NO_PROTECTION
    row = file_message(session, hub.sealer, raw=item.raw, direction="out", case_id=case_id,
                       protection=prot, thread_reason=reason,
                       hub_domain=hub.domain, patient_email=patient.email,
                       index=SqlCaseIndex(session, hub.domain, partner_domains(hub)),
                       envelope_from=item.sender, envelope_to=heads.recipients,
                       msg=parse_message(item.raw))
    if row is not None:
        audit.append(session, actor, "filed", message_id=row.message_id, case_id=case_id,
                     detail={"direction": "out", "reason": reason,
                             "encryption": prot.encryption, "signature": prot.signature})
    return case_id, (row.message_id_norm if row is not None else None)


def file_outbound(session: Session, hub: Any, raw: bytes, sender: str, recipients: Iterable[str],
                  *, protection: Protection | None = None, actor: str = "outbound") -> str | None:
    """Store a coordinator's case message; its case id, or None when it is not case mail."""
    return file_outbound_many(session, hub, [OutboundItem(raw, sender, list(recipients),
                                                          protection)], actor=actor)[0]
