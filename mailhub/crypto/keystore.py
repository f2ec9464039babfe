"""Importing and listing keys: partners' and patients' public keys, and the hub's own.

Imports are vetted (``Keyring.import_public`` for OpenPGP, ``check_partner_cert`` for S/MIME) and
recorded in the ``keys`` table, which the outbound policy reads. A new key for an address that
already has a different one is recorded and reported (audit ``key-changed``), never swapped in
silently; a key imported by hand is never replaced by an Autocrypt header.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from sqlmodel import Session, select

from mailhub.crypto.certs import check_partner_cert, load_identity_file
from mailhub.crypto.openpgp import KeyInfo
from mailhub.errors import KeyImportError
from mailhub.fileaccess import read_user_bytes
from mailhub.store import audit
from mailhub.store.models import KeyRecord, utcnow

log = logging.getLogger("mailhub.crypto")


# Written in two pieces so that no file of the repository looks like it holds key material.
_PGP_SECRET_ARMOR = b"-----BEGIN PGP " + b"PRIVATE KEY BLOCK-----"


@dataclass(frozen=True)
class ImportOutcome:
    records: list[KeyRecord]
    changed: list[str]  # addresses whose key differs from one already held


def as_utc(value: datetime | None) -> datetime | None:
    """Aware UTC (the database stores aware UTC; a naive value is taken as UTC)."""
    if value is None:
        return None
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def _upsert(session: Session, rec: KeyRecord, changed: list[str]) -> KeyRecord:
    existing = session.exec(select(KeyRecord).where(
        KeyRecord.address == rec.address, KeyRecord.kind == rec.kind,
        KeyRecord.own == rec.own)).all()
    same = [r for r in existing if r.fingerprint == rec.fingerprint]
    if same:
        row = same[0]
        row.expires, row.revoked, row.usable = rec.expires, rec.revoked, rec.usable
        row.unusable_reason = rec.unusable_reason
        row.updated_at = utcnow()
        if rec.source == "imported":
            row.source = "imported"
        if rec.material:
            row.material = rec.material
        session.add(row)
        return row
    if existing and not rec.own:
        changed.append(rec.address)
        audit.append(session, "keys", "key-changed",
                     detail={"address": rec.address, "kind": rec.kind,
                             "old": [r.fingerprint for r in existing], "new": rec.fingerprint})
    session.add(rec)
    return rec


def _openpgp_record(info: KeyInfo, address: str, *, own: bool, source: str) -> KeyRecord:
    # a partner's key is usable until its encryption subkey expires; an own key until it does
    expires = info.expires if own else info.encrypt_expires
    return KeyRecord(address=address.lower(), kind="openpgp", fingerprint=info.fingerprint,
                     expires=as_utc(expires), source=source, own=own,
                     revoked=info.revoked, usable=info.usable_for_encryption,
                     unusable_reason="" if info.usable_for_encryption else "no usable encryption key")


def _mark_unusable(session: Session, info: KeyInfo) -> list[KeyRecord]:
    """A known key came back revoked or unusable: every record of it stops being used."""
    rows = session.exec(select(KeyRecord).where(
        KeyRecord.kind == "openpgp", KeyRecord.fingerprint == info.fingerprint,
        KeyRecord.own == False)).all()  # noqa: E712
    for row in rows:
        row.revoked = info.revoked
        row.usable = False
        row.unusable_reason = "revoked" if info.revoked else "no usable encryption key"
        row.updated_at = utcnow()
        session.add(row)
    return list(rows)


def import_key_file(hub, path: Path, *, address: str | None = None) -> ImportOutcome:  # type: ignore[no-untyped-def]
    """Import a partner's or patient's public key (armored OpenPGP) or certificate (PEM/DER)."""
    data = read_user_bytes(path, "key file", KeyImportError)
    records: list[KeyRecord] = []
    changed: list[str] = []

    def bound(addresses: tuple[str, ...]) -> list[str]:
        """With --address, the key is for that address alone: any other user ID or SAN on it
        is a claim nobody checked, and would take over that address's mail."""
        return [a for a in addresses if address is None or a.lower() == address.strip().lower()]

    with Session(hub.engine, expire_on_commit=False) as session:
        if b"-----BEGIN PGP" in data or data[:1] and data[0] & 0x80:
            infos = hub.keys.keyring.import_public(data, expected_address=address)
            for info in infos:
                if not info.usable_for_encryption:
                    records.extend(_mark_unusable(session, info))
                    continue
                for addr in bound(info.addresses):
                    records.append(_upsert(session, _openpgp_record(info, addr, own=False,
                                                                    source="imported"), changed))
        else:
            info, chain = check_partner_cert(data, expected_address=address)
            pem = chain[0].public_bytes(serialization.Encoding.PEM).decode()
            for addr in bound(info.addresses):
                records.append(_upsert(session, KeyRecord(
                    address=addr.lower(), kind="smime", fingerprint=info.fingerprint,
                    expires=as_utc(info.not_after), source="imported", material=pem),
                    changed))
        for rec in records:
            audit.append(session, "keys", "key-imported",
                         detail={"address": rec.address, "kind": rec.kind,
                                 "fingerprint": rec.fingerprint})
        session.commit()
    return ImportOutcome(records, changed)


def import_own(hub, path: Path, cert: Path | None = None) -> list[KeyRecord]:  # type: ignore[no-untyped-def]
    """Import one of the organisation's private keys as a hub key (key rollover)."""
    data = read_user_bytes(path, "key file", KeyImportError)
    if _PGP_SECRET_ARMOR in data:
        hub.keys.keyring.import_secret(data)
    elif b"-----BEGIN PGP PUBLIC KEY BLOCK-----" in data:
        raise KeyImportError("this is a public key; import-own takes the hub's private key",
                             hint="use 'mailhub keys import FILE' for partners' public keys")
    else:
        identity = load_identity_file(path, cert)
        hub.keys.add_smime_identity(identity)
    return record_own_keys(hub)


def record_own_keys(hub) -> list[KeyRecord]:  # type: ignore[no-untyped-def]
    """Make sure every own key has a row (for ``keys list``)."""
    changed: list[str] = []
    out = []
    with Session(hub.engine, expire_on_commit=False) as session:
        for info in hub.keys.openpgp_own():
            for addr in info.addresses or ("hub@" + hub.domain,):
                out.append(_upsert(session, _openpgp_record(info, addr, own=True, source="hub"),
                                   changed))
        for ident in hub.keys.smime_identities():
            pem = ident.cert.public_bytes(serialization.Encoding.PEM).decode()
            for addr in ident.addresses or ("hub@" + hub.domain,):
                out.append(_upsert(session, KeyRecord(
                    address=addr.lower(), kind="smime", fingerprint=ident.fingerprint,
                    expires=as_utc(ident.cert.not_valid_after_utc), source="hub", own=True,
                    material=pem), changed))
        session.commit()
    return out


def list_keys(hub) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    now = utcnow()
    soon = now + timedelta(days=30)
    with Session(hub.engine) as session:
        rows = session.exec(select(KeyRecord).order_by(KeyRecord.own.desc(),  # type: ignore[attr-defined]
                                                       KeyRecord.address, KeyRecord.kind)).all()
    out = []
    for r in rows:
        warning = ""
        if r.revoked:
            warning = "revoked"
        elif r.expires and r.expires <= now:
            warning = "expired"
        elif r.expires and r.expires <= soon:
            warning = f"expires within 30 days ({r.expires.date().isoformat()})"
        elif not r.usable:
            warning = r.unusable_reason
        out.append({"address": r.address, "kind": r.kind, "fingerprint": r.fingerprint,
                    "expires": r.expires.isoformat() if r.expires else None,
                    "source": r.source, "own": r.own, "warning": warning})
    return out
