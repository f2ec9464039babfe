"""Opening inbound mail: decrypt and verify OpenPGP or S/MIME, then set Mailhub-Protection.

``open_message`` runs in a crypto worker process: bytes and PEMs in, the readable message and
plain facts out. Whatever ``Mailhub-Protection`` header arrived from outside is removed and the
hub's own is set, so nobody can forge a "verified" badge. Bad input raises DecryptionFailed.
"""

from __future__ import annotations

import email
import email.policy
from dataclasses import dataclass, replace

from mailhub.crypto.protection import HEADER, format_protection
from mailhub.parse.rawheaders import get_header, prepend_headers, remove_headers


@dataclass(frozen=True)
class InboundKeys:
    """What a worker needs to open mail: the hub's keyring and S/MIME material."""

    gnupghome: str
    identity_pems: tuple[tuple[bytes, bytes], ...]  # own (key, cert) PEM pairs
    known_cert_pems: tuple[bytes, ...]  # partners' certificates, for verification


@dataclass(frozen=True)
class Opened:
    raw: bytes  # readable message, with the hub's Mailhub-Protection header
    encryption: str
    signature: str
    signer: str | None
    signed_with: str = ""  # "openpgp" | "smime" when signed: how to tie the signer to From
    signer_addresses: tuple[str, ...] = ()  # the S/MIME signer certificate's addresses

    def with_signature(self, signature: str) -> Opened:
        """The same message with another signature verdict, its header set again."""
        return replace(self, raw=_with_protection(self.raw, self.encryption, signature,
                                                  self.signer), signature=signature)


def is_smime(raw: bytes) -> bool:
    ctype = (get_header(raw, "Content-Type") or "").lower()
    return "pkcs7" in ctype or "application/x-pkcs7" in ctype


def _with_protection(raw: bytes, encryption: str, signature: str, signer: str | None) -> bytes:
    raw = remove_headers(raw, {HEADER.lower()})
    return prepend_headers(raw, [(HEADER, format_protection(encryption, signature, signer))])


def open_message(raw: bytes, keys: InboundKeys) -> Opened:
    """Decrypt/verify ``raw`` with the hub's keys (runs in a worker process)."""
    if is_smime(raw):
        from mailhub.crypto.smime_inbound import unwrap_pems

        opened, facts = unwrap_pems(raw, keys.identity_pems, keys.known_cert_pems)
        enc, sig = str(facts["encryption"]), str(facts["signature"])
        signer = facts["signer"] if isinstance(facts["signer"], str) else None
        addresses = facts["signer_addresses"]
        return Opened(_with_protection(opened, enc, sig, signer), enc, sig, signer,
                      "smime" if sig != "none" else "",
                      tuple(str(a) for a in addresses) if isinstance(addresses, list) else ())
    from mailhub.crypto.pgp_inbound import unwrap

    result = unwrap(raw, gnupghome=keys.gnupghome)
    enc, sig, signer = result.encryption, result.signature, result.signer
    if result.was_pgp:
        opened = result.message.as_bytes(policy=email.policy.SMTP)
    else:
        opened = raw  # nothing to open: keep the bytes exactly as they came
    return Opened(_with_protection(opened, enc, sig, signer), enc, sig, signer,
                  "openpgp" if sig != "none" else "")


def protection_of(raw: bytes) -> tuple[str, str, str | None]:
    """Read back the hub's header from an opened message (encryption, signature, signer)."""
    from mailhub.crypto.protection import parse_protection

    value = get_header(raw, HEADER)
    if not value:
        return "none", "none", None
    p = parse_protection(value)
    return p.encryption, p.signature, p.signer


def parse(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore[return-value]
