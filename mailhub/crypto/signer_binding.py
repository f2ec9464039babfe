"""A good signature is "verified" only when the key that made it belongs to the sender.

gpg and the CMS check answer "this key signed these bytes", and the hub's keyring holds every
key it has met: partners' and patients' keys, and keys learnt from Autocrypt headers, including
a changed one that is recorded but never used. Without this check, anyone whose key the hub
holds (or who got one in through an Autocrypt header) could sign mail "From" a partner clinic
and have it marked verified, passing a ``signed-and-encrypted`` rule. So, for every From
address: an OpenPGP signer must be a key recorded for that address (not a changed Autocrypt
key kept unused), an S/MIME signer certificate must name that address. Otherwise the verdict
becomes ``unknown-key``: the hub knows no key of this sender that made the signature.
"""

from __future__ import annotations

from email.utils import getaddresses

from sqlmodel import Session, col, select

from mailhub.crypto.inbound import Opened
from mailhub.parse.rawheaders import field_name, split_message
from mailhub.store.models import KeyRecord


def from_addresses(raw: bytes) -> list[str]:
    """Every address in every From field, lower-cased."""
    fields, _, _ = split_message(raw)
    values = [f.split(b":", 1)[1].decode("utf-8", "replace") for f in fields
              if field_name(f) == "from" and b":" in f]
    return [a.strip().lower() for _, a in getaddresses(values) if a.strip()]


def _openpgp_bound(session: Session, fingerprint: str, senders: set[str]) -> bool:
    rows = session.exec(select(KeyRecord).where(
        KeyRecord.kind == "openpgp", KeyRecord.fingerprint == fingerprint.upper(),
        col(KeyRecord.address).in_(sorted(senders)))).all()
    trusted = {r.address for r in rows if r.source != "autocrypt" or r.usable}
    return senders <= trusted


def signer_matches_sender(session: Session, opened: Opened) -> bool:
    """True when the signer of a verified message is a key of each of its From addresses."""
    senders = set(from_addresses(opened.raw))
    if not senders or not opened.signer:
        return False
    if opened.signed_with == "smime":
        return senders <= {a.strip().lower() for a in opened.signer_addresses}
    if opened.signed_with == "openpgp":
        return _openpgp_bound(session, opened.signer, senders)
    return False


def bind_to_sender(session: Session, opened: Opened) -> Opened:
    """``opened`` as it is, or with ``signature=unknown-key`` when the signer is not the sender's."""
    if opened.signature != "verified" or signer_matches_sender(session, opened):
        return opened
    return opened.with_signature("unknown-key")
