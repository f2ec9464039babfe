"""The append-only, tamper-evident audit log: one hash chain over every decision on case mail.

Each ``AuditEntry`` carries the hash of the one before it (``prev_hash``) and its own ``hash``:
sha256 over a canonical JSON serialisation of its fields plus ``prev_hash``. A single-row
``AuditHead`` holds the last sequence number and hash, so ``verify`` notices a changed entry
(hash mismatch), a deleted one (gap in ``seq``, or a broken chain) and a cut-off tail (the log
ends before the head). Someone able to rewrite the whole database can recompute the chain too:
note ``VerifyResult.last_hash`` somewhere else now and then to anchor it.

``append`` writes inside the caller's transaction, so an entry commits (or rolls back) with the
work it records. The chain is serialised across writers: on PostgreSQL by a transaction-scoped
advisory lock plus ``SELECT ... FOR UPDATE`` on the head (READ COMMITTED, the default); on
SQLite by taking the write lock first (an UPDATE of the head) so two writers never both read
the same head. ``seq`` is assigned under that lock rather than by a database sequence, because
a rolled-back insert would leave a gap in a sequence, and gaps here mean deletion.

``detail`` is JSON text with facts about the decision (rule, recipient, fingerprint, reason):
never a body, a key or a password; ``append`` refuses values that look like one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Column, DateTime, Integer, Text, text
from sqlalchemy.orm import Session
from sqlmodel import Field, SQLModel, select

from mailhub.errors import StoreError

GENESIS = "0" * 64
MAX_DETAIL = 8192
MAX_MESSAGE_ID = 998
ACTIONS = ("accepted", "decrypted", "filed", "encrypted", "held", "sent", "refused", "released",
           "dropped", "failed", "key-imported", "key-changed", "case-opened", "case-merged",
           "scheduled", "rules-reloaded")
_ACTION = re.compile(r"^[a-z][a-z0-9-]{0,39}$")
_NOT_LETTER = re.compile(r"[^a-z]")
_PG_LOCK_KEY = 0x6D61696C687562  # "mailhub": the advisory lock that serialises the chain
_FORBIDDEN_KEYS = {"body", "content", "payload", "html", "password", "passwd", "passphrase",
                   "secret", "privatekey", "keydata", "armor", "armored"}


class AuditError(StoreError):
    """An audit entry was refused (bad action, or a detail that could hold secret content)."""


class AuditEntry(SQLModel, table=True):
    """One decision about case mail; immutable once written (``verify`` shows any change)."""

    __tablename__ = "audit_entry"

    seq: int | None = Field(default=None, sa_column=Column(Integer, primary_key=True,
                                                           autoincrement=False))
    at: datetime = Field(sa_column=Column(DateTime(timezone=False), nullable=False))  # naive UTC
    actor: str = Field(sa_column=Column(Text, nullable=False))
    action: str = Field(sa_column=Column(Text, nullable=False, index=True))
    message_id: str | None = Field(default=None, sa_column=Column(Text, index=True))
    case_id: str | None = Field(default=None, sa_column=Column(Text, index=True))
    detail: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    prev_hash: str = Field(sa_column=Column(Text, nullable=False))
    hash: str = Field(sa_column=Column(Text, nullable=False))

    def detail_data(self) -> Any:
        return json.loads(self.detail or "{}")


class AuditHead(SQLModel, table=True):
    """The chain's tip (one row, id 1): where the log must end, for spotting a cut-off tail."""

    __tablename__ = "audit_head"

    id: int = Field(default=1, sa_column=Column(Integer, primary_key=True, autoincrement=False))
    seq: int = Field(default=0, sa_column=Column(Integer, nullable=False))
    hash: str = Field(default=GENESIS, sa_column=Column(Text, nullable=False))


AUDIT_TABLES = (AuditEntry.__table__, AuditHead.__table__)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    entries: int
    first_bad_seq: int | None
    problem: str
    last_hash: str = GENESIS


def _fmt_at(at: datetime) -> str:
    if at.tzinfo is not None:
        at = at.astimezone(UTC).replace(tzinfo=None)
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# made once: ``json.dumps`` with options builds a new encoder on every call
_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _canonical_values(values: Mapping[str, Any], at_text: str | None = None) -> bytes:
    """The bytes an entry's hash covers: every field but ``hash``, as sorted compact JSON
    (``at_text``: ``values["at"]`` already formatted, shared by the entries of one append)."""
    data = {"seq": values["seq"], "at": at_text or _fmt_at(values["at"]),
            "actor": values["actor"], "action": values["action"],
            "message_id": values["message_id"], "case_id": values["case_id"],
            "detail": values["detail"], "prev_hash": values["prev_hash"]}
    return _JSON.encode(data).encode()


def canonical(entry: AuditEntry) -> bytes:
    """The bytes an entry's hash covers (see ``_canonical_values``)."""
    return _canonical_values({"seq": entry.seq, "at": entry.at, "actor": entry.actor,
                              "action": entry.action, "message_id": entry.message_id,
                              "case_id": entry.case_id, "detail": entry.detail,
                              "prev_hash": entry.prev_hash})


def entry_hash(entry: AuditEntry) -> str:
    return hashlib.sha256(canonical(entry)).hexdigest()


@functools.lru_cache(maxsize=1024)
def _forbidden_key(key: str) -> bool:
    """Whether a detail key names content or a secret (cached: the same few keys recur)."""
    return _NOT_LETTER.sub("", key.lower()) in _FORBIDDEN_KEYS


_PLAIN = (int, float, bool, type(None))


def _check_detail(value: Any, path: str = "detail") -> None:
    kind = type(value)
    if kind in _PLAIN:  # most values: numbers and None (the ABC checks below are slow)
        return
    if kind is str:
        if "-----BEGIN " in value:
            raise AuditError(f"audit {path} holds armored key or certificate material",
                             hint="record the fingerprint instead")
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if _forbidden_key(str(k)):
                raise AuditError(f"audit {path}.{k} may hold a body, key or password",
                                 hint="record facts about the message (ids, addresses, "
                                 "fingerprints, reasons), never its content or secrets")
            _check_detail(v, f"{path}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_detail(v, f"{path}[{i}]")
    elif isinstance(value, str) and "-----BEGIN " in value:
        raise AuditError(f"audit {path} holds armored key or certificate material",
                         hint="record the fingerprint instead")


def _detail_json(detail: Mapping[str, Any] | None) -> str:
    if detail is None:
        return "{}"
    if not isinstance(detail, Mapping):
        raise AuditError("audit detail must be a mapping (a JSON object)")
    _check_detail(detail)
    try:
        out = _JSON.encode(detail)
    except (TypeError, ValueError) as exc:
        raise AuditError(f"audit detail is not JSON data: {exc}") from exc
    if len(out) > MAX_DETAIL:
        raise AuditError(f"audit detail is {len(out)} characters (at most {MAX_DETAIL})",
                         hint="record facts about the message, not its content")
    return out


def _clip_message_id(message_id: str | None) -> str | None:
    """Message-IDs come from outside: keep them indexable, and a clipped one still unique."""
    if message_id is None or len(message_id) <= MAX_MESSAGE_ID:
        return message_id
    digest = hashlib.sha256(message_id.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"{message_id[:MAX_MESSAGE_ID - 20]}...#{digest}"


_INSERT_ENTRY = AuditEntry.__table__.insert()  # type: ignore[attr-defined]
_HEAD = AuditHead.__table__  # type: ignore[attr-defined]
_READ_HEAD = text("SELECT seq, hash FROM audit_head WHERE id = 1")
_READ_HEAD_FOR_UPDATE = text("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE")
_SET_HEAD = text("UPDATE audit_head SET seq = :seq, hash = :hash WHERE id = 1")


def _lock_head(session: Session) -> tuple[int, str]:
    """Take the chain lock for this transaction and return the head (created on first use)."""
    dialect = session.get_bind().dialect.name
    conn = session.connection()
    if dialect == "sqlite":
        conn.execute(text("UPDATE audit_head SET seq = seq WHERE id = 1"))
        row = conn.execute(_READ_HEAD).first()
    else:
        if dialect == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
        row = conn.execute(_READ_HEAD_FOR_UPDATE).first()
    if row is None:
        conn.execute(_HEAD.insert(), {"id": 1, "seq": 0, "hash": GENESIS})
        return 0, GENESIS
    return int(row[0]), str(row[1])


@dataclass(frozen=True)
class Pending:
    """One entry to append (``append_many`` writes a batch of them with two statements)."""

    actor: str
    action: str
    message_id: str | None = None
    case_id: str | None = None
    detail: Mapping[str, Any] | None = None


def _chain_head(session: Session) -> tuple[Any, int, str]:
    """The chain's head for this transaction: locked and read once per transaction, then kept.

    The head is keyed by the innermost transaction: entering or leaving a savepoint (released
    or rolled back) re-reads it from the database, so a rolled-back entry is never chained to.
    """
    session.flush()  # the caller's pending ORM objects go first, as they always did
    session.connection()  # begins the transaction now, so ``tx`` below is never None
    tx = session.get_nested_transaction() or session.get_transaction()
    cached = session.info.get("audit_head")
    if tx is not None and cached is not None and cached[0] is tx:
        return tx, cached[1], cached[2]
    seq, prev = _lock_head(session)
    return tx, seq, prev


def _entry_values(p: Pending, seq: int, prev: str, at: datetime,
                  at_text: str | None = None) -> dict[str, Any]:
    if not _ACTION.match(p.action or ""):
        raise AuditError(f"audit action {p.action!r} is not a lower-case word",
                         hint=f"use one of: {', '.join(ACTIONS)}")
    if not p.actor or not p.actor.strip():
        raise AuditError("audit actor is empty", hint="name who acted: 'smtp-inbound', a user...")
    values: dict[str, Any] = {
        "seq": seq, "at": at, "actor": p.actor.strip(), "action": p.action,
        "message_id": _clip_message_id(p.message_id), "case_id": p.case_id,
        "detail": _detail_json(p.detail), "prev_hash": prev}
    values["hash"] = hashlib.sha256(_canonical_values(values, at_text)).hexdigest()
    return values


def append_many(session: Session, entries: list[Pending]) -> list[dict[str, Any]]:
    """Add entries at the end of the chain, in order, in the caller's transaction.

    The chain lock is held until that transaction ends, so commit promptly. Entries go in with
    one multi-row INSERT and the head with one UPDATE: the hot path appends several entries for
    every message. Every entry is checked (action, actor, detail) before anything is written.
    """
    if not entries:
        return []
    at = datetime.now(UTC).replace(tzinfo=None)
    tx, seq, prev = _chain_head(session)
    at_text = _fmt_at(at)
    rows = []
    for p in entries:
        seq += 1
        values = _entry_values(p, seq, prev, at, at_text)
        prev = values["hash"]
        rows.append(values)
    conn = session.connection()
    conn.execute(_INSERT_ENTRY, rows)
    conn.execute(_SET_HEAD, {"seq": seq, "hash": prev})
    session.info["audit_head"] = (tx, seq, prev)
    return rows


def append(session: Session, actor: str, action: str, *, message_id: str | None = None,
           case_id: str | None = None, detail: Mapping[str, Any] | None = None) -> AuditEntry:
    """Add one entry at the end of the chain, in the caller's transaction (caller commits).

    The returned ``AuditEntry`` is a snapshot, not attached to the session.
    """
    (values,) = append_many(session, [Pending(actor, action, message_id, case_id, detail)])
    return AuditEntry(**values)


def iter_entries(session: Session, *, message_id: str | None = None,
                 case_id: str | None = None, batch: int = 1000) -> Iterator[AuditEntry]:
    """Entries in chain order, optionally only those about one message or case."""
    stmt = select(AuditEntry).order_by(AuditEntry.seq)  # type: ignore[arg-type]
    if message_id is not None:
        stmt = stmt.where(AuditEntry.message_id == message_id)
    if case_id is not None:
        stmt = stmt.where(AuditEntry.case_id == case_id)
    yield from session.scalars(stmt.execution_options(yield_per=batch))


def verify(session: Session) -> VerifyResult:
    """Walk the whole chain; report the first entry that was changed, removed or cut off."""
    expected_seq, prev, count = 1, GENESIS, 0

    def bad(seq: int, problem: str) -> VerifyResult:
        return VerifyResult(False, count, seq, problem, prev)

    for e in iter_entries(session):
        if e.seq != expected_seq:
            if e.seq is not None and e.seq > expected_seq:
                gone = (f"entry {expected_seq} is" if e.seq == expected_seq + 1
                        else f"entries {expected_seq} to {e.seq - 1} are")
                return bad(expected_seq, f"{gone} missing: deleted from the audit log")
            return bad(expected_seq, f"entry {e.seq} is out of order")
        if e.prev_hash != prev:
            return bad(expected_seq, f"entry {e.seq} does not follow entry {expected_seq - 1}: "
                       "prev_hash differs (an entry before it was changed or removed)")
        if entry_hash(e) != e.hash:
            return bad(expected_seq, f"entry {e.seq} was changed after it was written "
                       "(its hash no longer matches its content)")
        prev, count, expected_seq = e.hash, count + 1, expected_seq + 1

    head = session.scalars(select(AuditHead).where(AuditHead.id == 1)
                           .execution_options(populate_existing=True)).first()
    if head is None:
        if count:
            return bad(1, "the audit head row is missing: the log's end cannot be checked")
        return VerifyResult(True, 0, None, "", GENESIS)
    if head.seq > count:
        return bad(count + 1, f"the log ends at entry {count} but the head records entry "
                   f"{head.seq}: entries {count + 1} to {head.seq} were removed")
    if head.seq < count:
        return bad(head.seq + 1, f"entries after {head.seq} were added outside the audit log's "
                   "append (the head records fewer entries)")
    if head.hash != prev:
        return bad(max(count, 1), f"the head's hash does not match entry {count}: it was changed")
    return VerifyResult(True, count, None, "", prev)
