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
from datetime import UTC, datetime
from email.message import Message
from email.utils import format_datetime, getaddresses, make_msgid
from typing import TypeVar

from sqlmodel import Session

from mailhub.cases.store import parse_headers
from mailhub.cases.subjects import add_case_tag
from mailhub.crypto.autocrypt import make_header as make_autocrypt_header
from mailhub.crypto.autocrypt import unfold as autocrypt_unfold
from mailhub.crypto.engine import CryptoEngine, ProtectJob
from mailhub.deliver.queue import GroupCommit
from mailhub.errors import MailhubError
from mailhub.outbound.queueing import QueueWriter, RowSpec, WriteJob
from mailhub.parse.headers import addresses
from mailhub.parse.rawheaders import (
    field_name,
    get_header,
    join_message,
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
    raw: bytes = field(repr=False)  # the plaintext message: never in logs or tracebacks
    message_id: str
    sender: str
    visible: set[str]
    decisions: dict[str, OutboundDecision]
    outputs: dict[str, bytes] = field(default_factory=dict, repr=False)  # recipient -> wire bytes
    failures: dict[str, str] = field(default_factory=dict)  # recipient -> crypto error
    case_id: str | None = None
    headers: Message | None = None  # the header section as the case store parses it
    to_cc: list[str] | None = None  # normalized To and Cc addresses


_UNFOLD = re.compile(rb"\r?\n[ \t]+")


def _first_values(fields: list[bytes], names: tuple[str, ...]) -> dict[str, str]:
    return _first_values_named([(field_name(f), f) for f in fields], names)


def _first_values_named(fields: list[tuple[str, bytes]], names: tuple[str, ...]
                        ) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, f in fields:
        if name in names and name not in out:
            value = f.split(b":", 1)[1] if b":" in f else b""
            out[name] = _UNFOLD.sub(b" ", value).strip().decode("utf-8", "replace")
    return out


def first_values(raw: bytes, names: tuple[str, ...]) -> dict[str, str]:
    """The first value of each named header (lower-case names), as ``get_header`` gives it,
    from one pass over the header block (every message needs several)."""
    return _first_values(split_message(raw)[0], names)


_DROPPED = frozenset({"bcc", "mailhub-protection"})
_WANTED = ("message-id", "date")


def ensure_headers(raw: bytes, domain: str, *, spool_id: str | None = None,
                   received_at: float | None = None) -> tuple[bytes, str]:
    """Keep the client's Message-ID; add one (and a Date) only when missing; drop Bcc.

    With ``spool_id`` (and ``received_at``), an added Message-ID (and Date) derive from the
    spooled message, so preparing it again (a retry, a replay after a crash) gives the same
    ones and the message is filed and queued under one id. One pass over the headers."""
    fields, eol, body = split_message(raw)
    named = [(field_name(f), f) for f in fields]
    kept = [f for name, f in named if name not in _DROPPED]
    found = _first_values_named(named, _WANTED)
    added: list[bytes] = []
    message_id = found.get("message-id", "").strip()
    if not message_id:
        message_id = f"<{spool_id}@{domain}>" if spool_id else make_msgid(domain=domain)
        added.append(f"Message-ID: {message_id}".encode())
    if not found.get("date"):
        when = (datetime.fromtimestamp(received_at, UTC) if received_at is not None
                else time_now())
        added.append(f"Date: {format_datetime(when)}".encode())
    if added or len(kept) != len(fields):
        raw = join_message(added + kept, eol, body)
    return raw, message_id


def time_now() -> datetime:
    return datetime.now(UTC)


def visible_recipients(raw: bytes) -> set[str]:
    """Everyone named in To or Cc (lower-cased): they see each other, so they may share a
    ciphertext; anyone else is a Bcc recipient."""
    return {a.lower() for a in addresses(parse_headers(raw), "To", "Cc")}


class OutboundPipeline:
    """Turns spooled submissions into queue rows. One instance per serving process."""

    def __init__(self, hub, crypto: CryptoEngine, *,  # type: ignore[no-untyped-def]
                 on_queued: Callable[[], None] | None = None, writer: QueueWriter | None = None,
                 case_hook: Callable[[Session, list[Prepared]], list[str | None]] | None = None
                 ) -> None:
        """``case_hook(session, preps)`` files messages into their cases before they are
        protected and returns each one's case id (then ``[ID]`` goes into the protected
        Subject)."""
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
        self._autocrypt: dict[tuple[str, bytes], str] = {}  # (From value, key) -> header

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
        """Our Autocrypt header for the From address (replies then encrypt to the hub's key).

        Remembered per From value and key: a coordinator sends many messages, and building
        the header (address parsing, base64 of the key) cost as much as writing a queue row."""
        key = (get_header(raw, "From") or "", binary)
        header = self._autocrypt.get(key)
        if header is None:
            froms = [a for _, a in getaddresses([key[0]]) if a]
            header = ("" if len(froms) != 1 else
                      autocrypt_unfold(make_autocrypt_header(froms[0], binary,
                                                             prefer_encrypt=True)))
            if len(self._autocrypt) >= 1024:
                self._autocrypt.clear()
            self._autocrypt[key] = header
        return header

    def consent(self, address: str) -> bool:
        """Whether a patient recorded consent to plain email (asked only when no key helps)."""
        from mailhub.scheduler.ledger import consent_for

        with Session(self.hub.engine) as session:
            return consent_for(session, address)

    def prepare(self, sm: SpooledMessage) -> Prepared:
        cfg = self.hub.config
        raw, message_id = ensure_headers(
            sm.content, cfg.hub.domain, spool_id=sm.spool_id,
            received_at=sm.envelope.received_at)
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
        headers = parse_headers(raw)
        to_cc = addresses(headers, "To", "Cc")
        # everyone named in To or Cc sees the others: they may share a ciphertext
        return Prepared(sm.spool_id, raw, message_id, sm.envelope.mail_from,
                        {a.lower() for a in to_cc}, decisions, headers=headers, to_cc=to_cc)

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
        await self.protect_all([prep])

    async def protect_all(self, preps: list[Prepared]) -> None:
        """Sign and encrypt every protection group of a batch in one call to the crypto pool;
        a group that fails is tried once more at once, and if it fails again only its own
        recipients are held."""
        work: list[tuple[Prepared, list[str], ProtectJob]] = []
        for prep in preps:
            for rcpt, d in prep.decisions.items():
                if d.action == "plaintext":
                    prep.outputs[rcpt] = prep.raw
            work += [(prep, rcpts, job) for rcpts, job in self.jobs(prep)]
        results = await self._protect_groups(work)
        again = [i for i, r in enumerate(results) if not isinstance(r, bytes)]
        if again:  # once more at once: a gpg or worker hiccup must not mean a held notice
            for i in again:
                log.warning("protecting message_id=%s failed (%s); trying once more",
                            work[i][0].message_id, _why(results[i]))
            for i, result in zip(again, await self._protect_groups([work[i] for i in again]),
                                 strict=True):
                results[i] = result
        for (prep, rcpts, job), result in zip(work, results, strict=True):
            for rcpt in rcpts:
                if isinstance(result, bytes):
                    prep.outputs[rcpt] = result
                else:
                    why = _why(result)
                    if not isinstance(result, MailhubError):
                        log.error("protecting message_id=%s failed: %r", prep.message_id, result)
                    prep.failures[rcpt] = f"{job.method} encryption failed: {why}"

    async def _protect_groups(self, work: list[tuple[Prepared, list[str], ProtectJob]]
                              ) -> list[bytes | BaseException]:
        try:
            return await self.crypto.protect_many([(p.raw, job) for p, _, job in work])
        except Exception as exc:  # noqa: BLE001 - the pool itself failed: every group of it
            return [exc] * len(work)

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

    def tag_subject(self, prep: Prepared) -> None:
        """Put ``[ID]`` into the Subject (which encryption then protects)."""
        if prep.case_id:
            subject = get_header(prep.raw, "Subject") or ""
            tagged = add_case_tag(subject, prep.case_id)
            if tagged != subject:
                prep.raw = prepend_headers(remove_headers(prep.raw, {"subject"}),
                                           [("Subject", tagged)])

    def file_cases_in(self, session: Session, preps: list[Prepared]) -> None:
        """File messages into their cases in the caller's transaction (a replay dedupes)."""
        assert self.case_hook is not None
        for prep, case_id in zip(preps, self.case_hook(session, preps), strict=True):
            prep.case_id = case_id

    def job(self, prep: Prepared) -> WriteJob:
        return WriteJob(prep.spool_id, prep.message_id, prep.sender, self.rows(prep),
                        prep.case_id)

    async def _in_transaction(self, fn: Callable[[Session], T]) -> T:
        if self.commits is not None:
            return await self.commits.run(fn)

        def own() -> T:
            with Session(self.hub.engine, expire_on_commit=False) as session:
                result = fn(session)
                session.commit()
                return result

        return await asyncio.to_thread(own)

    def _load_prepare(self, listener: str, spool_ids: list[str]
                      ) -> list[Prepared | BaseException]:
        out: list[Prepared | BaseException] = []
        for sid in spool_ids:
            try:
                out.append(self.prepare(self.hub.spool.load(listener, sid)))
            except Exception as exc:  # noqa: BLE001 - that message alone fails
                out.append(exc)
        return out

    async def process(self, listener: str, spool_id: str) -> None:
        """One spooled message to queue rows (raises what made it fail)."""
        failed = await self.process_many(listener, [spool_id])
        if spool_id in failed:
            raise failed[spool_id]

    async def process_many(self, listener: str, spool_ids: list[str]
                           ) -> dict[str, BaseException]:
        """Spooled messages to queue rows, sharing thread hops, queries and one commit; the
        spool entries go only after that commit. Returns the messages that failed (each is
        retried alone when a shared step fails, so one bad message fails only itself)."""
        loaded = await asyncio.to_thread(self._load_prepare, listener, spool_ids)
        failed = {sid: r for sid, r in zip(spool_ids, loaded, strict=True)
                  if isinstance(r, BaseException)}
        preps = [r for r in loaded if isinstance(r, Prepared)]
        if not preps:
            return failed
        try:
            await self._queue_rows(preps)
        except Exception as exc:
            if len(preps) == 1:
                failed[preps[0].spool_id] = exc
                return failed
            for prep in preps:  # find the one that broke the batch: each alone
                failed.update(await self.process_many(listener, [prep.spool_id]))
            return failed
        await asyncio.to_thread(self._remove, listener, [p.spool_id for p in preps])
        if self.on_queued:
            self.on_queued()
        if self.on_filed:
            for prep in preps:
                if prep.case_id:
                    self.on_filed(prep.case_id, None, prep.raw)
        return failed

    async def _queue_rows(self, preps: list[Prepared]) -> None:
        if self.case_hook is not None:
            await self._in_transaction(lambda session: self.file_cases_in(session, preps))
            for prep in preps:
                self.tag_subject(prep)
        await self.protect_all(preps)
        jobs = [self.job(prep) for prep in preps]
        await self._in_transaction(lambda session: self.writer.write_many(session, jobs))

    def _remove(self, listener: str, spool_ids: list[str]) -> None:
        for sid in spool_ids:
            self.hub.spool.remove(listener, sid)


def _why(result: bytes | BaseException) -> str:
    """What a failed protection may tell the sender (a MailhubError's text is safe to show)."""
    return str(result) if isinstance(result, MailhubError) else "internal error"
