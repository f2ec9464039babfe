"""Which case an inbound message joins: one pure decision over plain data.

The contract (product brief, "Threading"), in this order, first match wins:

1. ``subject-tag``: the Subject carries ``[ID]`` and that case exists (several tags: the first
   one naming an existing case);
2. ``case-address``: a recipient is ``case+ID@<hub domain>`` and that case exists;
3. ``references`` / ``in-reply-to``: an id in References or In-Reply-To names a message already
   in a case. References wins over In-Reply-To, and within References the LAST known entry
   (the nearest known ancestor) decides, so a client that dropped entries, or an In-Reply-To
   pointing elsewhere, does not matter. Only the FIRST stored message with an id counts (the
   index answers so), so a later message reusing that id captures nothing;
4. ``child-reference``: a message already in a case names this message's Message-ID (the
   parent arrived after its reply). Skipped when this Message-ID is already stored (a reused
   id must not take over the first message's replies) or when replies in several cases name
   it (ambiguous: the coordinator decides);
5. ``patient-open-case``: the sender is a patient with exactly one open case;
6. ``new-case``: anything else opens a new ``inquiry`` case.

Subject text alone never joins. ``unverified_sender`` flags a join made only through a tag, a
case address or Message-IDs when the sender is neither a participant of that case nor at a
partner domain: anyone can copy a tag, so the store files the message but marks it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import Message
from typing import Protocol, runtime_checkable

from mailhub.cases.subjects import canonical_case_id, find_case_tags, format_case_id
from mailhub.errors import NotFound
from mailhub.parse.headers import addresses, normalize_address, raw_headers, safe_header
from mailhub.parse.msgid import dedupe_and_cap, normalize_msgid, parse_msgid_list

log = logging.getLogger("mailhub.cases")

REASONS = (
    "subject-tag",
    "case-address",
    "references",
    "in-reply-to",
    "child-reference",
    "patient-open-case",
    "new-case",
)


@dataclass(frozen=True)
class Incoming:
    """What threading needs from an inbound message (ids normalized or raw, either works)."""

    message_id: str | None
    in_reply_to: list[str]
    references: list[str]
    subject: str
    from_addr: str
    to_addrs: list[str]
    hub_domain: str


@runtime_checkable
class CaseIndex(Protocol):
    """What the case store answers; message ids are in ``normalize_msgid`` form, addresses in
    ``normalize_address`` form. The store implements it with indexed queries."""

    def case_exists(self, case_id: str) -> bool: ...

    def cases_for_message_ids(self, msgids: list[str]) -> dict[str, str]:
        """Normalized id -> case of the FIRST stored message with that id (known ids only)."""
        ...

    def cases_referencing(self, msgid: str) -> list[str]:
        """Cases holding a message whose References/In-Reply-To name ``msgid``."""
        ...

    def open_cases_for_patient(self, address: str) -> list[str]: ...

    def is_participant(self, case_id: str, address: str) -> bool: ...

    def is_partner_address(self, address: str) -> bool: ...


@dataclass(frozen=True)
class Decision:
    """Where the message goes (``case_id`` None: open a new inquiry case) and why."""

    case_id: str | None
    reason: str
    unverified_sender: bool
    detail: str


def case_address_id(address: str, hub_domain: str) -> str | None:
    """The case id in a ``case+ID@<hub domain>`` address (any case, quoted or not), or None."""
    norm = normalize_address(address)
    if norm is None:
        return None
    local, _, domain = norm.rpartition("@")
    if domain != hub_domain.strip().rstrip(".").lower():
        return None
    local = local.strip('"')
    if local[:5].lower() != "case+":
        return None
    return canonical_case_id(local[5:])


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _clean_ids(values: Iterable[str], own: str | None) -> list[str]:
    """Normalized, deduplicated, capped ids, without the message's own id (a loop)."""
    ids: list[str] = []
    for value in values:
        ids.extend(parse_msgid_list(value))
    return [i for i in dedupe_and_cap(ids) if i != own]


def _joined(case_id: str, reason: str, detail: str, sender: str, index: CaseIndex) -> Decision:
    known = bool(sender) and (
        index.is_participant(case_id, sender) or index.is_partner_address(sender)
    )
    if not known:
        detail += "; sender is not a participant of the case nor at a partner domain"
    return Decision(case_id, reason, not known, detail)


def _decide(msg: Incoming, index: CaseIndex) -> Decision:
    sender = normalize_address(msg.from_addr) or ""
    own = normalize_msgid(msg.message_id) if msg.message_id else None
    if own is None and msg.message_id:
        own = next(iter(parse_msgid_list(msg.message_id)), None)
    notes: list[str] = []

    for cid in find_case_tags(msg.subject):
        if index.case_exists(cid):
            return _joined(cid, "subject-tag", f"Subject carries [{cid}]", sender, index)
        notes.append(f"Subject tag [{cid}] names no case")

    for addr in msg.to_addrs:
        cid = case_address_id(addr, msg.hub_domain)
        if cid is None:
            continue
        if index.case_exists(cid):
            return _joined(cid, "case-address", f"addressed to case+{cid}@", sender, index)
        notes.append(f"case address for {cid} names no case")

    refs = _clean_ids(msg.references, own)
    irt = _clean_ids(msg.in_reply_to, own)
    asked = _unique(refs + irt + ([own] if own else []))
    known = index.cases_for_message_ids(asked) if asked else {}
    for mid in reversed(refs):
        if mid in known:
            detail = f"References names {mid}, stored in {known[mid]}"
            return _joined(known[mid], "references", detail, sender, index)
    for mid in irt:
        if mid in known:
            detail = f"In-Reply-To names {mid}, stored in {known[mid]}"
            return _joined(known[mid], "in-reply-to", detail, sender, index)

    if own is not None:
        if own in known:
            notes.append("Message-ID already stored from another message: reused, not a parent")
        else:
            children = _unique(index.cases_referencing(own))
            if len(children) == 1:
                detail = f"a message in {children[0]} names this Message-ID"
                return _joined(children[0], "child-reference", detail, sender, index)
            if children:
                notes.append(f"messages in {len(children)} cases name this Message-ID")

    if sender:
        open_cases = _unique(index.open_cases_for_patient(sender))
        if len(open_cases) == 1:
            return Decision(
                open_cases[0], "patient-open-case", False, "the patient's one open case"
            )
        if open_cases:
            notes.append(f"the patient has {len(open_cases)} open cases")

    detail = "; ".join(notes) or "no case tag, case address, known Message-ID or open case"
    return Decision(None, "new-case", False, detail)


def assign_case(msg: Incoming, index: CaseIndex) -> Decision:
    """The case ``msg`` joins (module docstring for the rules). Never raises on bad input."""
    decision = _decide(msg, index)
    log.debug(
        "case decision: case=%s reason=%s unverified=%s",
        decision.case_id,
        decision.reason,
        decision.unverified_sender,
    )
    return decision


def incoming_from_message(
    msg: Message,
    hub_domain: str,
    recipients: Iterable[str] = (),
    envelope_from: str | None = None,
) -> Incoming:
    """``Incoming`` from a parsed (decrypted) message plus its SMTP envelope, hostile-safe.

    Recipients are the envelope's plus To/Cc; the sender is From, else the envelope sender.
    """
    ids = parse_msgid_list(" ".join(raw_headers(msg, "Message-ID")))
    senders = addresses(msg, "From") or [a for a in [normalize_address(envelope_from)] if a]
    rcpts: list[str] = [a for a in (normalize_address(r) for r in recipients) if a]
    rcpts += addresses(msg, "To", "Cc")
    return Incoming(
        message_id=ids[0] if ids else None,
        in_reply_to=parse_msgid_list(" ".join(raw_headers(msg, "In-Reply-To"))),
        references=parse_msgid_list(" ".join(raw_headers(msg, "References"))),
        subject=safe_header(msg, "Subject"),
        from_addr=senders[0] if senders else "",
        to_addrs=_unique(rcpts),
        hub_domain=hub_domain,
    )


@dataclass
class _Case:
    patient: str
    status: str
    participants: set[str]


class MemoryCaseIndex:
    """The reference ``CaseIndex``: in memory, same answers the SQL store must give.

    Also records messages (``add_message``) and applies decisions (``file``) so that tests and
    tools can replay a mail flow without a database.
    """

    def __init__(self, partner_domains: Iterable[str] = (), year: int | None = None) -> None:
        self._cases: dict[str, _Case] = {}
        self._first_holder: dict[str, str] = {}
        self._referencing: dict[str, list[str]] = {}
        self._partners = {d.strip().rstrip(".").lower() for d in partner_domains}
        self._year = year if year is not None else datetime.now(UTC).year
        self._seq = 0

    def open_case(
        self, patient_email: str, case_id: str | None = None, status: str = "inquiry"
    ) -> str:
        """Opens a case (next ``MT-<year>-NNNN`` unless ``case_id`` is given); returns its id."""
        if case_id is None:
            self._seq += 1
            cid = format_case_id(self._year, self._seq)
        else:
            cid = canonical_case_id(case_id) or ""
            if not cid:
                raise ValueError(f"not a case id: {case_id!r}")
        patient = normalize_address(patient_email) or ""
        self._cases[cid] = _Case(patient, status, {patient} if patient else set())
        return cid

    def _case(self, case_id: str) -> _Case:
        case = self._cases.get(case_id)
        if case is None:
            raise NotFound(f"no case {case_id}", hint="list cases with 'mailhub cases list'")
        return case

    def set_status(self, case_id: str, status: str) -> None:
        self._case(case_id).status = status

    def add_participant(self, case_id: str, address: str) -> None:
        norm = normalize_address(address)
        if norm:
            self._case(case_id).participants.add(norm)

    def add_message(
        self,
        case_id: str,
        message_id: str | None,
        in_reply_to: Iterable[str] = (),
        references: Iterable[str] = (),
    ) -> None:
        """Records a stored message: its id (first holder wins) and the ids it names."""
        self._case(case_id)
        own = normalize_msgid(message_id) if message_id else None
        if own is not None and own not in self._first_holder:
            self._first_holder[own] = case_id
        for mid in _clean_ids([*references, *in_reply_to], own):
            holders = self._referencing.setdefault(mid, [])
            if case_id not in holders:
                holders.append(case_id)

    def file(self, msg: Incoming, decision: Decision) -> str:
        """Applies ``decision``: a new inquiry case for the sender if needed, then the message;
        a verified sender becomes a participant."""
        cid = decision.case_id or self.open_case(msg.from_addr)
        self.add_message(cid, msg.message_id, msg.in_reply_to, msg.references)
        if not decision.unverified_sender:
            self.add_participant(cid, msg.from_addr)
        return cid

    def case_exists(self, case_id: str) -> bool:
        return case_id in self._cases

    def cases_for_message_ids(self, msgids: list[str]) -> dict[str, str]:
        return {m: self._first_holder[m] for m in msgids if m in self._first_holder}

    def cases_referencing(self, msgid: str) -> list[str]:
        return list(self._referencing.get(msgid, []))

    def open_cases_for_patient(self, address: str) -> list[str]:
        norm = normalize_address(address)
        return [
            cid
            for cid, case in self._cases.items()
            if norm and case.patient == norm and case.status != "closed"
        ]

    def is_participant(self, case_id: str, address: str) -> bool:
        case = self._cases.get(case_id)
        norm = normalize_address(address)
        return case is not None and norm is not None and norm in case.participants

    def is_partner_address(self, address: str) -> bool:
        norm = normalize_address(address)
        return norm is not None and norm.rpartition("@")[2] in self._partners
