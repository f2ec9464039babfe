"""The outbound path: a spooled submission becomes per-recipient queue rows, protected or held.

For each spooled message: add a Message-ID if the client gave none (never replace one), drop
Bcc, decide per recipient with the policy chain, sign and encrypt once per protection group (all
visible recipients of one method share a ciphertext that is also encrypted to the hub; each Bcc
recipient gets a ciphertext of its own so nobody learns of them), then commit the queue rows,
payloads, notices and audit entries in one transaction and only then remove the spool file.
Re-processing a spool file after a crash finds its rows and does nothing twice.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from email.utils import format_datetime, getaddresses, make_msgid
from typing import TypeVar

from sqlmodel import Session

from mailhub.cases.subjects import add_case_tag
from mailhub.crypto.autocrypt import make_header as make_autocrypt_header
from mailhub.crypto.autocrypt import unfold as autocrypt_unfold
from mailhub.crypto.engine import CryptoEngine, ProtectJob
from mailhub.deliver.queue import GroupCommit
from mailhub.errors import MailhubError
from mailhub.outbound.queueing import QueueWriter, RowSpec
from mailhub.parse.rawheaders import (
    field_name,
    get_header,
    prepend_headers,
    remove_headers,
    split_message,
)
from mailhub.policy.outbound import OutboundDecision, RecipientContext, decide_recipient
from mailhub.policy.trace import log_decision, trace_to_json
from mailhub.spool.spool import SpooledMessage

log = logging.getLogger("mailhub.outbound")
T = TypeVar("T")


@dataclass
class Prepared:
    spool_id: str
    raw: bytes
    message_id: str
    sender: str
    visible: set[str]
    decisions: dict[str, OutboundDecision]
    outputs: dict[str, bytes] = field(default_factory=dict)  # recipient -> wire bytes
    failures: dict[str, str] = field(default_factory=dict)  # recipient -> crypto error
    case_id: str | None = None


_UNFOLD = re.compile(rb"\r?\n[ \t]+")


def first_values(raw: bytes, names: tuple[str, ...]) -> dict[str, str]:
    """The first value of each named header (lower-case names), as ``get_header`` gives it,
    from one pass over the header block (every message needs several)."""
    out: dict[str, str] = {}
    fields, _, _ = split_message(raw)
    for f in fields:
        name = field_name(f)
        if name in names and name not in out:
            value = f.split(b":", 1)[1] if b":" in f else b""
            out[name] = _UNFOLD.sub(b" ", value).strip().decode("utf-8", "replace")
    return out


def ensure_headers(raw: bytes, domain: str) -> tuple[bytes, str]:
    """Keep the client's Message-ID; add one (and a Date) only when missing; drop Bcc."""
    raw = remove_headers(raw, {"bcc", "mailhub-protection"})
    added: list[tuple[str, str]] = []
    found = first_values(raw, ("message-id", "date"))
    message_id = found.get("message-id", "").strip()
    if not message_id:
        message_id = make_msgid(domain=domain)
        added.append(("Message-ID", message_id))
    if not found.get("date"):
        added.append(("Date", format_datetime(time_now())))
    return (prepend_headers(raw, added) if added else raw), message_id


def time_now():  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime

    return datetime.now(UTC)


def visible_recipients(raw: bytes) -> set[str]:
    found = first_values(raw, ("to", "cc"))
    values = [found.get(name, "") for name in ("to", "cc")]
    return {addr.lower() for _, addr in getaddresses(values) if addr}


class OutboundPipeline:
    """Turns spooled submissions into queue rows. One instance per serving process."""

    def __init__(self, hub, crypto: CryptoEngine, *,  # type: ignore[no-untyped-def]
                 on_queued: Callable[[], None] | None = None, writer: QueueWriter | None = None,
                 case_hook: Callable[[Session, Prepared], str | None] | None = None) -> None:
        """``case_hook(session, prep)`` files the message into its case before it is protected
        and returns the case id (then ``[ID]`` goes into the protected Subject)."""
        self.hub = hub
        self.crypto = crypto
        self.on_queued = on_queued
        self.writer = writer or QueueWriter(hub)
        self.case_hook = case_hook
        self.on_filed: Callable[[str, str | None, bytes], None] | None = None  # IMAP copy
        # the serving process's single writer (set by the Server): commits shared between
        # messages; without it each step commits on its own
        self.commits: GroupCommit | None = None
        self._signers: tuple[float, str, bytes, bytes, bytes] | None = None

    def _signer_material(self) -> tuple[str, bytes, bytes, bytes]:
        """The hub's newest OpenPGP fingerprint (and its minimal binary public key, for the
        Autocrypt header) and S/MIME key/cert, re-read every minute."""
        now = time.monotonic()
        if self._signers is None or now - self._signers[0] > 60:
            fpr = self.hub.keys.openpgp_signer().fingerprint
            binary = self.hub.keys.keyring.export_public_binary(fpr, minimal=True)
            ident = self.hub.keys.smime_signer()
            self._signers = (now, fpr, ident.key_pem(), ident.cert_pem(), binary)
        return self._signers[1], self._signers[2], self._signers[3], self._signers[4]

    def autocrypt_header(self, raw: bytes, binary: bytes) -> str:
        """Our Autocrypt header for the From address (replies then encrypt to the hub's key)."""
        froms = [a for _, a in getaddresses([get_header(raw, "From") or ""]) if a]
        if len(froms) != 1:
            return ""
        return autocrypt_unfold(make_autocrypt_header(froms[0], binary, prefer_encrypt=True))

    def consent(self, address: str) -> bool:
        """Whether a patient recorded consent to plain email (asked only when no key helps)."""
        from mailhub.scheduler.ledger import consent_for

        with Session(self.hub.engine) as session:
            return consent_for(session, address)

    def prepare(self, sm: SpooledMessage) -> Prepared:
        cfg = self.hub.config
        raw, message_id = ensure_headers(sm.content, cfg.hub.domain)
        policy = self.hub.policy_cache.current()
        decisions: dict[str, OutboundDecision] = {}
        for rcpt in dict.fromkeys(sm.envelope.rcpt_tos):
            keys = self.hub.key_snapshot.candidates(rcpt)
            ctx = RecipientContext(address=rcpt, hub_domain=cfg.hub.domain,
                                   internal_relay_set=cfg.delivery.internal_relay is not None,
                                   keys=keys, consent_plain_email=False)
            decision = decide_recipient(ctx, policy)
            # consent is only looked at when every earlier rule missed (the decision would be a
            # hold): ask the database then, not for every recipient of every message
            if (decision.action == "hold" and not any(k.usable for k in keys)
                    and self.consent(rcpt)):
                decision = decide_recipient(replace(ctx, consent_plain_email=True), policy)
            decisions[rcpt] = decision
            log_decision(message_id, decision.trace, recipient=rcpt)
        return Prepared(sm.spool_id, raw, message_id, sm.envelope.mail_from,
                        visible_recipients(raw), decisions)

    def jobs(self, prep: Prepared) -> list[tuple[list[str], ProtectJob]]:
        """Group recipients that can share one ciphertext; each Bcc recipient alone."""
        groups: dict[tuple[str, str], list[str]] = {}
        for rcpt, d in prep.decisions.items():
            if d.action != "encrypt" or d.method is None:
                continue
            key = (d.method, "visible" if rcpt.lower() in prep.visible else f"bcc:{rcpt}")
            groups.setdefault(key, []).append(rcpt)
        if not groups:
            return []
        fpr, key_pem, cert_pem, binary = self._signer_material()
        autocrypt = self.autocrypt_header(prep.raw, binary)
        out = []
        for (method, _), rcpts in groups.items():
            if method == "openpgp":
                fprs = tuple(dict.fromkeys([*(prep.decisions[r].key_fingerprint or "" for r in rcpts), fpr]))
                job = ProtectJob("openpgp", gnupghome=str(self.hub.keys.gnupg_home),
                                 signer_fpr=fpr, recipient_fprs=fprs,
                                 autocrypt_header=autocrypt)
            else:
                certs = []
                for r in rcpts:
                    rec = self.hub.key_snapshot.record(r, "smime", prep.decisions[r].key_fingerprint or "")
                    certs.append((rec.material or "").encode() if rec else b"")
                job = ProtectJob("smime", signer_key_pem=key_pem, signer_cert_pem=cert_pem,
                                 recipient_cert_pems=(*certs, cert_pem))
            out.append((rcpts, job))
        return out

    async def protect(self, prep: Prepared) -> None:
        for rcpt, d in prep.decisions.items():
            if d.action == "plaintext":
                prep.outputs[rcpt] = prep.raw
        jobs = self.jobs(prep)
        results = await asyncio.gather(*(self.crypto.protect(prep.raw, job) for _, job in jobs),
                                       return_exceptions=True)
        for (rcpts, job), result in zip(jobs, results, strict=True):
            for rcpt in rcpts:
                if isinstance(result, bytes):
                    prep.outputs[rcpt] = result
                else:
                    why = str(result) if isinstance(result, MailhubError) else "internal error"
                    if not isinstance(result, MailhubError):
                        log.error("protecting message_id=%s failed: %r", prep.message_id, result)
                    prep.failures[rcpt] = f"{job.method} encryption failed: {why}"

    def rows(self, prep: Prepared) -> list[RowSpec]:
        specs = []
        for rcpt, d in prep.decisions.items():
            trace = trace_to_json(d.trace)
            if rcpt in prep.outputs:
                specs.append(RowSpec(recipient=rcpt, status="queued", method=d.method or "plaintext",
                                     relay=d.relay, data=prep.outputs[rcpt], reason=d.reason,
                                     require_tls=d.require_tls, trace=trace))
            else:
                reason = prep.failures.get(rcpt) or d.reason
                specs.append(RowSpec(recipient=rcpt, status="held", method=d.method or "",
                                     relay=d.relay, data=prep.raw, reason=reason, trace=trace))
        return specs

    def file_case_in(self, session: Session, prep: Prepared) -> None:
        """File into the case in the caller's transaction (a replay dedupes)."""
        assert self.case_hook is not None
        prep.case_id = self.case_hook(session, prep)

    def tag_subject(self, prep: Prepared) -> None:
        """Put ``[ID]`` into the Subject (which encryption then protects)."""
        if prep.case_id:
            subject = get_header(prep.raw, "Subject") or ""
            tagged = add_case_tag(subject, prep.case_id)
            if tagged != subject:
                prep.raw = prepend_headers(remove_headers(prep.raw, {"subject"}),
                                           [("Subject", tagged)])

    def file_case(self, prep: Prepared) -> None:
        """File into the case (own transaction; a replay dedupes) and tag the Subject."""
        with Session(self.hub.engine, expire_on_commit=False) as session:
            self.file_case_in(session, prep)
            session.commit()
        self.tag_subject(prep)

    def write_rows(self, session: Session, prep: Prepared) -> int:
        """Rows, payloads, notices and audit entries, in the caller's transaction."""
        return self.writer.write(session, source_id=prep.spool_id, message_id=prep.message_id,
                                 sender=prep.sender, specs=self.rows(prep), case_id=prep.case_id)

    def commit(self, sm: SpooledMessage, prep: Prepared) -> int:
        """Write rows, payloads, notices and audit in one transaction; then drop the spool file."""
        with Session(self.hub.engine, expire_on_commit=False) as session:
            n = self.write_rows(session, prep)
            session.commit()
        self.hub.spool.remove(sm.envelope.listener, sm.spool_id)
        return n

    async def _in_transaction(self, fn: Callable[[Session], T]) -> T:
        if self.commits is not None:
            return await self.commits.run(fn)

        def own() -> T:
            with Session(self.hub.engine, expire_on_commit=False) as session:
                result = fn(session)
                session.commit()
                return result

        return await asyncio.to_thread(own)

    def _load_prepare(self, listener: str, spool_id: str) -> tuple[SpooledMessage, Prepared]:
        sm = self.hub.spool.load(listener, spool_id)
        return sm, self.prepare(sm)

    async def process(self, listener: str, spool_id: str) -> None:
        sm, prep = await asyncio.to_thread(self._load_prepare, listener, spool_id)
        if self.case_hook is not None:
            await self._in_transaction(lambda session: self.file_case_in(session, prep))
            self.tag_subject(prep)
        await self.protect(prep)
        await self._in_transaction(lambda session: self.write_rows(session, prep))
        await asyncio.to_thread(self.hub.spool.remove, listener, spool_id)
        if self.on_queued:
            self.on_queued()
        if self.on_filed and prep.case_id:
            self.on_filed(prep.case_id, None, prep.raw)
