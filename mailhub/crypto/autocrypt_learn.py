"""Learning keys from inbound Autocrypt headers (Autocrypt Level 1 peer state per address).

Rules: a key imported by hand is never replaced by an Autocrypt header (a different key seen
there is only recorded and reported); a changed Autocrypt key for an address we already hold an
Autocrypt key for is recorded as a change and kept unusable until someone imports it by hand, so
a forged header cannot silently redirect a patient's mail; a key seen for the first time is used.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from email.utils import getaddresses, parsedate_to_datetime

from sqlmodel import Session, select

from mailhub.crypto.autocrypt import PeerState, select_header, update_peer
from mailhub.crypto.keystore import as_utc
from mailhub.errors import MailhubError
from mailhub.parse.rawheaders import field_name, split_message
from mailhub.store import audit
from mailhub.store.models import KeyRecord, utcnow

log = logging.getLogger("mailhub.crypto")


def _header_values(raw: bytes, name: str) -> list[str]:
    fields, _, _ = split_message(raw)
    out = []
    for f in fields:
        if field_name(f) == name:
            out.append(f.split(b":", 1)[1].decode("ascii", "replace").strip())
    return out


def _message_date(raw: bytes) -> datetime | None:
    values = _header_values(raw, "date")
    try:
        d = parsedate_to_datetime(values[0]) if values else None
    except (TypeError, ValueError, IndexError):
        return None
    if d is not None and d.tzinfo is None:
        d = d.replace(tzinfo=UTC)
    return d


def learn(session: Session, hub, raw: bytes) -> str:  # type: ignore[no-untyped-def]
    """Update peer state from one inbound message; returns what happened (for the record)."""
    froms = [a for _, a in getaddresses(_header_values(raw, "from")) if a]
    if len(froms) != 1:
        return "no single From address"
    addr = froms[0].lower()
    header = select_header(_header_values(raw, "autocrypt"), addr)
    rows = session.exec(select(KeyRecord).where(KeyRecord.address == addr,
                                                KeyRecord.kind == "openpgp",
                                                KeyRecord.own == False)).all()  # noqa: E712
    auto = [r for r in rows if r.source == "autocrypt"]
    now = utcnow()
    state = None
    if auto:
        r = auto[0]
        state = PeerState(addr=addr, last_seen=r.last_seen or now,
                          autocrypt_timestamp=r.autocrypt_timestamp,
                          public_key=b"known", prefer_encrypt="mutual" if r.prefer_encrypt else "nopreference")
    new = update_peer(state, header, _message_date(raw), addr, now=now)
    for r in auto:
        r.last_seen = new.last_seen
        r.updated_at = now
        session.add(r)
    if header is None or (state is not None and new.autocrypt_timestamp == state.autocrypt_timestamp):
        return "no usable Autocrypt header"
    try:
        infos = hub.keys.keyring.import_public(header.keydata, expected_address=addr)
    except MailhubError as exc:
        log.info("ignored Autocrypt header from %s: %s", addr, exc.message)
        return f"Autocrypt key refused: {exc.message}"
    fpr = infos[0].fingerprint
    prefer = header.prefer_encrypt == "mutual"
    same = [r for r in rows if r.fingerprint == fpr]
    if same:
        for r in same:
            if r.source == "autocrypt":
                r.autocrypt_timestamp, r.prefer_encrypt = new.autocrypt_timestamp, prefer
                r.updated_at = now
                session.add(r)
        return "Autocrypt key unchanged"
    imported = [r for r in rows if r.source == "imported"]
    changed = bool(imported or auto)
    rec = KeyRecord(address=addr, kind="openpgp", fingerprint=fpr,
                    expires=as_utc(infos[0].encrypt_expires), source="autocrypt", prefer_encrypt=prefer,
                    last_seen=new.last_seen, autocrypt_timestamp=new.autocrypt_timestamp,
                    usable=not changed and infos[0].usable_for_encryption,
                    unusable_reason=("a different key was seen in an Autocrypt header; "
                                     "import it by hand to use it") if changed else "")
    session.add(rec)
    if changed:
        audit.append(session, "autocrypt", "key-changed",
                     detail={"address": addr, "new": fpr,
                             "old": [r.fingerprint for r in rows], "kept": "old"})
        log.warning("Autocrypt header from %s carries a different key %s; recorded, not used",
                    addr, fpr)
        return "changed key recorded, not used"
    audit.append(session, "autocrypt", "key-learnt", detail={"address": addr, "fingerprint": fpr})
    return "key learnt"
