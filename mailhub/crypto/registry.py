"""The key registry: which keys the hub holds for which address, for the outbound policy.

OpenPGP public keys live in the hub's gpg keyring; S/MIME certificates live in the database
(``keys.material``); every key has a row in ``keys`` saying address, kind, fingerprint, expiry
and source. The policy reads a snapshot of those rows, refreshed when another process (the CLI)
imports a key, so a new key is used at once, without a restart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from datetime import datetime

from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from mailhub.crypto.keystore import as_utc
from mailhub.policy.outbound import KeyCandidate
from mailhub.store.models import KeyRecord, utcnow

log = logging.getLogger("mailhub.crypto")


def candidate_from_record(rec: KeyRecord, now: datetime) -> KeyCandidate:
    reason = ""
    if rec.revoked:
        reason = "revoked"
    elif rec.expires is not None and rec.expires <= now:
        reason = f"expired on {rec.expires.date().isoformat()}"
    elif not rec.usable:
        reason = rec.unusable_reason or "not usable for encryption"
    return KeyCandidate(kind=rec.kind, fingerprint=rec.fingerprint, usable=not reason,
                        reason=reason, source=rec.source, prefer_encrypt=rec.prefer_encrypt)


class KeySnapshot:
    """Partner/patient keys by lower-cased address, refreshed cheaply when the table changes."""

    def __init__(self, engine: Engine, check_every: float = 1.0) -> None:
        self.engine = engine
        self.check_every = check_every
        self._lock = threading.Lock()
        self._by_addr: dict[str, list[KeyRecord]] = {}
        self._stamp: tuple[object, ...] | None = None
        self._checked = 0.0

    def _current_stamp(self, session: Session) -> tuple[object, ...]:
        row = session.exec(select(func.count(KeyRecord.id),  # type: ignore[arg-type]
                                  func.max(KeyRecord.id), func.max(KeyRecord.updated_at))).one()
        return tuple(row)

    def refresh(self, force: bool = False) -> None:
        """Reload when the table changed (looked at once per ``check_every`` at most).

        Until a first snapshot is loaded every caller waits for it: a caller that went on
        with the empty map would see no key and hold a message that has one."""
        if not force and self._fresh():
            return
        with self._lock:
            if not force and self._fresh():
                return  # another thread refreshed it while this one waited
            with Session(self.engine) as session:
                stamp = self._current_stamp(session)
                if stamp == self._stamp and not force:
                    self._checked = time.monotonic()
                    return
                # newest first: among equally ranked keys the policy takes the first, and a
                # key imported by hand after another (a renewal) is the one to use
                rows = session.exec(select(KeyRecord).where(KeyRecord.own == False)  # noqa: E712
                                    .order_by(KeyRecord.id.desc())).all()  # type: ignore[union-attr]
            by_addr: dict[str, list[KeyRecord]] = defaultdict(list)
            for rec in rows:
                by_addr[rec.address.lower()].append(rec)
            self._by_addr = dict(by_addr)
            self._stamp = stamp
            self._checked = time.monotonic()

    def _fresh(self) -> bool:
        return self._stamp is not None and time.monotonic() - self._checked < self.check_every

    def candidates(self, address: str) -> tuple[KeyCandidate, ...]:
        self.refresh()
        now = utcnow()
        return tuple(candidate_from_record(r, now) for r in self._by_addr.get(address.lower(), []))

    def record(self, address: str, kind: str, fingerprint: str) -> KeyRecord | None:
        for rec in self._by_addr.get(address.lower(), []):
            if rec.kind == kind and rec.fingerprint == fingerprint:
                return rec
        return None

    def has_usable(self, address: str) -> bool:
        return any(c.usable for c in self.candidates(address))

    def changed_at(self, address: str) -> datetime | None:
        """When a key of ``address`` last arrived or changed (None: the hub knows none)."""
        self.refresh()
        return max((t for r in self._by_addr.get(address.lower(), [])
                    if (t := as_utc(r.updated_at)) is not None), default=None)
