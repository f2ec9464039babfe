"""The database schema (sqlmodel): users, keys, the outbound queue, cases, messages, the ledger.

Only what threading and queueing need is stored in the clear; all datetimes are aware UTC (Message-IDs, addresses, case ids,
dates); subjects and bodies are sealed with the at-rest key (``*_sealed`` columns, files under
data_dir for bodies).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, Column, Index, LargeBinary, Text, UniqueConstraint, text
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    """Aware UTC now: every datetime in the database is timezone-aware UTC."""
    return datetime.now(UTC)


class User(SQLModel, table=True):
    """A coordinator allowed to submit mail; the password is stored as a scrypt hash only."""

    __tablename__ = "users"
    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(index=True, unique=True)
    password_hash: str = Field(repr=False)  # never shown in logs or tracebacks
    created_at: datetime = Field(default_factory=utcnow)
    disabled: bool = False


class KeyRecord(SQLModel, table=True):
    """A key the hub knows: partners' and patients' public keys, and the hub's own."""

    __tablename__ = "keys"
    __table_args__ = (UniqueConstraint("kind", "fingerprint", "address", name="uq_key"),)
    id: int | None = Field(default=None, primary_key=True)
    address: str = Field(index=True)
    kind: str  # openpgp | smime
    fingerprint: str = Field(index=True)
    expires: datetime | None = None
    source: str = "imported"  # imported | autocrypt | hub
    own: bool = False  # one of the hub's own keys (has the private part)
    revoked: bool = False
    usable: bool = True
    unusable_reason: str = ""
    material: str | None = Field(default=None, sa_column=Column(Text), repr=False)  # cert PEM
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)  # any change (the policy's snapshot key)
    # Autocrypt Level 1 peer state (source == "autocrypt").
    prefer_encrypt: bool = False
    last_seen: datetime | None = None
    autocrypt_timestamp: datetime | None = None


class OutboundItem(SQLModel, table=True):
    """One row per recipient of an outbound message: queued, held, sent or failed."""

    __tablename__ = "outbound"
    __table_args__ = (
        UniqueConstraint("source_id", "recipient", name="uq_outbound_source_rcpt"),
        Index("ix_outbound_due", "status", "next_attempt_at"),
        # the payload sweep takes finished rows that still hold a payload, oldest first; rows
        # it has swept leave this index, so it stays as small as what is left to sweep
        Index("ix_outbound_unswept", "status", "updated_at", "id",
              sqlite_where=text("payload_id IS NOT NULL"),
              postgresql_where=text("payload_id IS NOT NULL")),
    )
    id: int | None = Field(default=None, primary_key=True)
    source_id: str = Field(index=True)  # the spool id of the submitted message
    message_id: str = ""
    sender: str = ""
    recipient: str
    status: str = "queued"  # queued | held | sent | failed
    reason: str = ""
    method: str = ""  # openpgp | smime | plaintext
    relay: str = "smarthost"  # smarthost | internal
    kind: str = "mail"  # mail | notice | dsn
    case_id: str | None = Field(default=None, index=True)
    payload_id: int | None = Field(default=None, foreign_key="payloads.id", index=True)
    require_tls: bool = False
    attempts: int = 0
    next_attempt_at: datetime = Field(default_factory=utcnow)
    sending_since: datetime | None = None  # set while a delivery is in flight (crash window)
    # who set sending_since ("host:pid:random"): at start, only claims of dead processes of
    # this host are taken back at once; another host's instance may still be sending
    claimed_by: str = Field(default="", sa_column_kwargs={"server_default": ""})
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    trace: str = Field(default="", sa_column=Column(Text))  # policy hits and misses (JSON)


class Payload(SQLModel, table=True):
    """A sealed wire message (or the sealed original while held); shared by recipient rows."""

    __tablename__ = "payloads"
    # rows naming a segment file (SQLite, large payloads): the sweep asks which are still named
    __table_args__ = (Index("ix_payloads_segment", "segment",
                            sqlite_where=text("segment IS NOT NULL"),
                            postgresql_where=text("segment IS NOT NULL")),)
    id: int | None = Field(default=None, primary_key=True)
    sealed: bytes = Field(sa_column=Column(LargeBinary, nullable=False), repr=False)
    created_at: datetime = Field(default_factory=utcnow)
    # where the sealed bytes lie when not in ``sealed``: segment number, offset, length
    segment: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    seg_offset: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    seg_length: int | None = Field(default=None, nullable=True)


class Patient(SQLModel, table=True):
    """The patient of one case (a row per case, so one journey's zone never moves another's)."""

    __tablename__ = "patients"
    id: int | None = Field(default=None, primary_key=True)
    name: str
    email: str = Field(index=True)  # normalized (normalize_address): the patient's identity
    timezone: str = "UTC"  # the patient's home zone
    language: str = "en"


class Case(SQLModel, table=True):
    """A patient journey; events are stored as UTC instants with their zone and local text."""

    __tablename__ = "cases"
    id: str = Field(primary_key=True)  # MT-2026-0042
    patient_id: int | None = Field(default=None, foreign_key="patients.id", index=True)
    status: str = Field(default="inquiry", index=True)
    procedure: str = ""
    clinic: str = Field(default="", index=True)
    coordinator: str = ""
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    merged_into: str | None = None
    consent_plain_email: bool = False
    consent_by: str = ""
    consent_at: datetime | None = None
    procedure_at: datetime | None = None
    procedure_tz: str = ""
    procedure_local: str = ""
    arrival_at: datetime | None = None
    arrival_tz: str = ""
    arrival_local: str = ""
    discharge_at: datetime | None = None
    discharge_tz: str = ""
    discharge_local: str = ""
    return_home_at: datetime | None = None
    return_home_tz: str = ""
    return_home_local: str = ""


class CaseCounter(SQLModel, table=True):
    """Next case number per year (case ids are MT-<year>-<number>), bumped by one upsert."""

    __tablename__ = "case_counters"
    year: int = Field(primary_key=True)
    last: int = 0


class Participant(SQLModel, table=True):
    """An address taking part in a case: mail it sends by tag or Message-ID is verified."""

    __tablename__ = "participants"
    __table_args__ = (UniqueConstraint("case_id", "address", name="uq_participant"),)
    id: int | None = Field(default=None, primary_key=True)
    case_id: str = Field(foreign_key="cases.id", index=True)
    address: str = Field(index=True)
    role: str = "other"  # patient | coordinator | clinic | other


class StoredMessage(SQLModel, table=True):
    """A message in a case file. Subject and the whole message are sealed; threading metadata
    is clear. ``message_id_norm`` and ``message_refs.ref_norm`` hold lookup keys (the
    normalized id, or a digest of it when very long: ``mailhub.cases.store.msgid_key``)."""

    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("message_id_norm", "body_digest", name="uq_messages_msgid_body"),
        Index("ix_messages_case_received", "case_id", "received_at"),
    )
    id: int | None = Field(default=None, primary_key=True)
    case_id: str = Field(foreign_key="cases.id")
    message_id: str = Field(sa_column=Column(Text, nullable=False))  # as in the header, <...>
    message_id_norm: str
    message_id_assigned: bool = False  # the message had none; the hub gave it this one
    in_reply_to: str = Field(default="", sa_column=Column(Text))  # normalized ids, space-separated
    references: str = Field(default="", sa_column=Column(Text))  # normalized, capped, space-sep.
    direction: str  # in | out
    from_addr: str = ""
    to_addrs: str = Field(default="[]", sa_column=Column(Text))  # JSON list
    subject_sealed: bytes = Field(default=b"", sa_column=Column(LargeBinary), repr=False)
    body_sealed: bytes | None = Field(default=None, sa_column=Column(LargeBinary), repr=False)  # whole message
    encryption: str = "none"
    signature: str = "none"
    signer: str = ""
    size: int = 0
    digest: str = Field(index=True, unique=True)  # sha256 of the raw message (dedupe)
    body_digest: str = ""  # sha256 of the body, line endings normalized (dedupe with Message-ID)
    unverified_sender: bool = False
    thread_reason: str = ""
    received_at: datetime = Field(default_factory=utcnow)
    sent_at: datetime | None = None
    trace: str = Field(default="", sa_column=Column(Text))


class MessageRef(SQLModel, table=True):
    """One row per Message-ID a stored message names (References/In-Reply-To), for lookups."""

    __tablename__ = "message_refs"
    __table_args__ = (Index("ix_message_refs_ref", "ref_norm"),)
    id: int | None = Field(default=None, primary_key=True)
    message_pk: int = Field(foreign_key="messages.id", index=True)
    case_id: str = Field(index=True)
    ref_norm: str


class Attachment(SQLModel, table=True):
    """Attachment metadata; the content stays inside the sealed message, the name is sealed."""

    __tablename__ = "attachments"
    id: int | None = Field(default=None, primary_key=True)
    message_pk: int = Field(foreign_key="messages.id", index=True)
    position: int = 0
    filename_sealed: bytes = Field(default=b"", sa_column=Column(LargeBinary))
    content_type: str = ""
    size: int = 0
    digest: str = ""


class ScheduleEntry(SQLModel, table=True):
    """The send ledger: one row per case step; claimed atomically before sending.

    ``queue_source_id`` is set (in the same transaction that spools the message) before the
    row is marked sent, so a row that has one is in the outbound path and is never recomputed
    or sent again. ``plan_version`` is the care plan's version when the step was (re)computed,
    ``template_version`` the rendered templates' version when it was sent.
    """

    __tablename__ = "schedule"
    __table_args__ = (
        UniqueConstraint("case_id", "step", name="uq_schedule_case_step"),
        Index("ix_schedule_due", "status", "send_at_utc"),  # claiming due rows
        Index("ix_schedule_next", "status", "claimed_by", "send_at_utc"),  # the next wake-up
        {"sqlite_autoincrement": True},  # ids are never reused: spool ids derive from them
    )
    id: int | None = Field(default=None, primary_key=True)
    case_id: str = Field(foreign_key="cases.id", index=True)
    step: str
    plan: str = ""
    template: str = ""
    template_version: str = ""
    plan_version: str = ""
    anchor: str = ""
    send_at_utc: datetime
    timezone: str = "UTC"
    valid_until_utc: datetime | None = None
    status: str = "pending"  # pending | sent | cancelled | missed | held
    reason: str = ""
    queue_source_id: str = ""  # spool id given to the outbound path (idempotent send)
    claimed_by: str = ""
    claimed_at: datetime | None = None
    attempts: int = 0
    sent_at: datetime | None = None
    updated_at: datetime = Field(default_factory=utcnow)
