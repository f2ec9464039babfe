"""Inbound S/MIME: decrypt with any of the hub's identities, verify signatures, restore headers.

Works on raw bytes because a detached signature covers the exact bytes of the signed part.
Handles enveloped-data (also the BER that Thunderbird writes, which cryptography's DER-only
decrypt refuses), opaque signed-data, detached multipart/signed, and any nesting of them.
Bad input always raises DecryptionFailed with a reason, never another exception type.
"""

from __future__ import annotations

import datetime as dt
import email.policy
import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser
from typing import Literal

from asn1crypto import cms, core
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mailhub.crypto.certs import (
    Identity,
    cert_addresses,
    fingerprint,
    load_certs,
    load_identity,
    subject_string,
)
from mailhub.crypto.smime import decode_body, multipart_parts, parse_lf, split_message, to_crlf
from mailhub.crypto.smime_verify import SignerCheck, find_cert, verify_signed_data
from mailhub.errors import DecryptionFailed

log = logging.getLogger("mailhub.crypto")

Encryption = Literal["smime", "none"]
Signature = Literal["verified", "invalid", "unknown-key", "none"]
_PKCS7_MIME = {"application/pkcs7-mime", "application/x-pkcs7-mime"}
_PKCS7_SIG = {"application/pkcs7-signature", "application/x-pkcs7-signature"}
_MAX_DEPTH = 8
_OAEP_HASHES = {"sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384,
                "sha512": hashes.SHA512}
# Set by the hub only: a copy inside the protected part must not survive the merge.
_NEVER_FROM_INSIDE = {"mailhub-protection"}


@dataclass
class Unwrapped:
    """The readable message and how it was protected (the Mailhub-Protection facts)."""

    raw: bytes  # the readable message as wire bytes (CRLF), outer headers merged back
    encryption: Encryption
    signature: Signature
    signer: str | None
    was_smime: bool
    signer_addresses: tuple[str, ...] = ()
    signer_fingerprint: str | None = None
    decrypted_with: str | None = None  # fingerprint of the hub certificate that opened it
    reason: str = ""

    @functools.cached_property
    def message(self) -> EmailMessage:
        """The readable message, parsed on first use (workers only need the bytes)."""
        return parse_lf(self.raw)

    def protection_header(self) -> str:
        """The value of the Mailhub-Protection header for this message."""
        value = f"encryption={self.encryption}; signature={self.signature}"
        return f"{value}; signer={self.signer}" if self.signer else value


@dataclass
class _State:
    identities: Sequence[Identity]
    known_certs: Sequence[x509.Certificate]
    now: dt.datetime | None
    encrypted_with: str | None = None
    checks: list[SignerCheck] = field(default_factory=list)
    layers: int = 0


# --- raw MIME -----------------------------------------------------------------------------


def _headers(fields: list[tuple[str, bytes]]) -> Message:
    head = b"".join(raw for _, raw in fields)
    return BytesHeaderParser(policy=email.policy.default).parsebytes(head + b"\r\n")


def _kind(headers: Message) -> str:
    ctype = headers.get_content_type()
    filename = str(headers.get_param("name", "") or headers.get_filename("") or "").lower()
    if ctype in _PKCS7_MIME or (ctype == "application/octet-stream" and filename.endswith(".p7m")):
        return "pkcs7-mime"
    if ctype == "multipart/signed" and str(headers.get_param("protocol", "")).lower() in _PKCS7_SIG:
        return "signed"
    return "leaf"


# --- decryption ---------------------------------------------------------------------------


class _GcmParams(core.Sequence):
    """GCMParameters (RFC 5084), which asn1crypto does not define."""

    _fields = [("aes_nonce", core.OctetString), ("aes_icvlen", core.Integer, {"default": 12})]


def _rid_matches(rid: cms.RecipientIdentifier, ident: Identity) -> bool:
    return find_cert(rid, [ident.cert]) is not None  # same matching rules as for signers


def _unwrap_cek(ktri: cms.KeyTransRecipientInfo, key: rsa.RSAPrivateKey, size: int) -> bytes:
    alg = ktri["key_encryption_algorithm"]
    encrypted = ktri["encrypted_key"].native
    if alg["algorithm"].native == "rsaes_oaep":
        params = alg["parameters"]
        hname = params["hash_algorithm"]["algorithm"].native
        mname = params["mask_gen_algorithm"]["parameters"]["algorithm"].native
        if hname not in _OAEP_HASHES or mname not in _OAEP_HASHES:
            raise DecryptionFailed(f"unsupported RSA-OAEP hash {hname}")
        return key.decrypt(encrypted, padding.OAEP(
            padding.MGF1(_OAEP_HASHES[mname]()), _OAEP_HASHES[hname](), None))
    try:
        cek = key.decrypt(encrypted, padding.PKCS1v15())
    except ValueError:
        cek = b""
    # A wrong-length key is replaced by a random one so failures look alike (RFC 3218).
    return cek if len(cek) == size else os.urandom(size)


def _content_cipher(alg: cms.EncryptionAlgorithm) -> tuple[str, int]:
    name = alg["algorithm"].native
    if name.startswith("aes") and name.endswith(("_cbc", "_gcm")):
        return name[-3:], int(name[3:6]) // 8
    if name == "tripledes_3key":
        return "3des", 24
    raise DecryptionFailed(f"unsupported content encryption algorithm {name}")


def _decrypt_content(mode: str, alg: cms.EncryptionAlgorithm, cek: bytes, data: bytes,
                     mac: bytes = b"", aad: bytes = b"") -> bytes:
    try:
        if mode == "gcm":
            params = _GcmParams.load(alg["parameters"].dump())
            if len(mac) != params["aes_icvlen"].native:
                raise ValueError("authentication tag length mismatch")
            return AESGCM(cek).decrypt(params["aes_nonce"].native, data + mac, aad or None)
        if mode == "3des":
            from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES

            block: object = TripleDES(cek)
            bits = 64
        else:
            block, bits = algorithms.AES(cek), 128
        iv = alg["parameters"].native
        decryptor = Cipher(block, modes.CBC(iv)).decryptor()  # type: ignore[arg-type]
        padded = decryptor.update(data) + decryptor.finalize()
        pad = padded[-1] if padded else 0
        if not 1 <= pad <= bits // 8 or padded[-pad:] != bytes([pad]) * pad:
            raise ValueError("bad padding")
        return padded[:-pad]
    except Exception as exc:  # wrong key, bad padding, tampering: all mean the same here
        raise DecryptionFailed("the encrypted content could not be decrypted (wrong key or "
                               "corrupted message)") from exc


def _decrypt(info: cms.ContentInfo, state: _State) -> bytes:
    """Open enveloped-data (CBC) or authenticated-enveloped-data (GCM) with a hub identity."""
    env = info["content"]
    auth = info["content_type"].native == "authenticated_enveloped_data"
    eci = env["auth_encrypted_content_info" if auth else "encrypted_content_info"]
    alg = eci["content_encryption_algorithm"]
    mode, size = _content_cipher(alg)
    if isinstance(eci["encrypted_content"], core.Void):
        raise DecryptionFailed("the enveloped-data carries no encrypted content")
    data = bytes(eci["encrypted_content"])
    recipients = []
    for ri in env["recipient_infos"]:
        if ri.name != "ktri":
            recipients.append(ri.name)
            continue
        for ident in state.identities:
            if not _rid_matches(ri.chosen["rid"], ident):
                continue
            cek = _unwrap_cek(ri.chosen, ident.key, size)
            mac = env["mac"].native if auth else b""
            aad = b""
            if auth and not isinstance(env["auth_attrs"], core.Void):
                aad = b"\x31" + env["auth_attrs"].dump()[1:]
            plain = _decrypt_content(mode, alg, cek, data, mac, aad)
            state.encrypted_with = ident.fingerprint
            return plain
        recipients.append(_describe_rid(ri.chosen["rid"]))
    raise DecryptionFailed(
        "the message is not encrypted to any of the hub's S/MIME certificates "
        f"(recipients: {'; '.join(recipients) or 'none'})",
        hint="ask the sender to encrypt to the hub's certificate ('mailhub keys export-hub --smime')",
    )


def _describe_rid(rid: cms.RecipientIdentifier) -> str:
    if rid.name == "issuer_and_serial_number":
        return f"issuer {rid.chosen['issuer'].human_friendly}, serial {rid.chosen['serial_number'].native:x}"
    return f"key id {rid.chosen.native.hex()}"


# --- the walk -----------------------------------------------------------------------------


def _layer(raw: bytes, state: _State) -> bytes:
    """Peel S/MIME layers until a plain entity remains; returns that entity's bytes."""
    while True:
        fields, body = split_message(raw)
        headers = _headers(fields)
        kind = _kind(headers)
        if kind == "leaf":
            return raw
        state.layers += 1
        if state.layers > _MAX_DEPTH:
            raise DecryptionFailed("too many nested S/MIME layers")
        if kind == "signed":
            raw = _detached(headers, body, state)
        else:
            raw = _opaque(decode_body(headers, body), state)


def _detached(headers: Message, body: bytes, state: _State) -> bytes:
    boundary = headers.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise DecryptionFailed("multipart/signed without a boundary")
    parts = multipart_parts(body, boundary)
    if len(parts) < 2:
        raise DecryptionFailed("the multipart/signed message lacks its signature part")
    sig_fields, sig_body = split_message(parts[1])
    sig_headers = _headers(sig_fields)
    if sig_headers.get_content_type() not in _PKCS7_SIG and not str(
        sig_headers.get_filename("")
    ).lower().endswith(".p7s"):
        raise DecryptionFailed(
            f"unexpected signature part {sig_headers.get_content_type()} in multipart/signed"
        )
    check, _ = verify_signed_data(
        decode_body(sig_headers, sig_body), parts[0], state.known_certs, state.now
    )
    state.checks.append(check)
    return parts[0]


def _opaque(der: bytes, state: _State) -> bytes:
    try:
        info = cms.ContentInfo.load(der)
        ctype = info["content_type"].native
    except Exception as exc:
        raise DecryptionFailed(f"the S/MIME part is not a CMS message: {exc}") from exc
    if ctype == "signed_data":
        check, content = verify_signed_data(der, None, state.known_certs, state.now)
        state.checks.append(check)
        return to_crlf(content)
    if ctype in ("enveloped_data", "authenticated_enveloped_data"):
        try:
            return to_crlf(_decrypt(info, state))
        except DecryptionFailed:
            raise
        except Exception as exc:
            raise DecryptionFailed(f"malformed S/MIME enveloped-data: {exc}") from exc
    raise DecryptionFailed(f"unsupported S/MIME content type {ctype}")


def _signature(checks: list[SignerCheck]) -> SignerCheck | None:
    """Any invalid layer makes the message invalid; otherwise the innermost signature counts."""
    if not checks:
        return None
    invalid = [c for c in checks if c.status == "invalid"]
    return invalid[0] if invalid else checks[-1]


def merge_headers(outer: list[tuple[str, bytes]], inner_raw: bytes) -> bytes:
    """The inner entity with the outer headers merged back; the protected Subject wins."""
    inner_fields, body = split_message(inner_raw)
    inner_fields = [f for f in inner_fields if f[0] not in _NEVER_FROM_INSIDE]
    inner_names = {n for n, _ in inner_fields}
    merged = [
        (name, raw) for name, raw in outer
        if not (name.startswith("content-") or name == "mime-version")
        and not (name == "subject" and "subject" in inner_names)
    ]
    outer_names = {n for n, _ in merged}
    merged.extend(f for f in inner_fields if f[0] not in outer_names)
    if "mime-version" not in outer_names | inner_names:
        merged.append(("mime-version", b"MIME-Version: 1.0\r\n"))
    return b"".join(r for _, r in merged) + b"\r\n" + body


def unwrap(
    msg: EmailMessage | bytes,
    *,
    identities: Sequence[Identity],
    known_certs: Sequence[x509.Certificate],
    now: dt.datetime | None = None,
) -> Unwrapped:
    """Decrypt and verify an inbound message; plain messages pass through unchanged."""
    try:
        raw = to_crlf(msg if isinstance(msg, bytes) else msg.as_bytes(policy=email.policy.SMTP))
        state = _State(identities, known_certs, now)
        outer_fields, _ = split_message(raw)
        inner = _layer(raw, state)
        readable = merge_headers(outer_fields, inner) if state.layers else raw
    except DecryptionFailed as exc:
        log.info("S/MIME message refused: %s", exc.message)
        raise
    except Exception as exc:  # the promise: bad input never escapes as another type
        log.info("S/MIME message unreadable: %s", type(exc).__name__)
        raise DecryptionFailed(f"unreadable S/MIME message: {exc}") from exc
    check = _signature(state.checks)
    log.debug("S/MIME opened: layers=%d encrypted=%s signature=%s", state.layers,
              bool(state.encrypted_with), check.status if check else "none")
    cert = check.cert if check else None
    return Unwrapped(
        raw=readable,
        encryption="smime" if state.encrypted_with else "none",
        signature=check.status if check else "none",
        signer=subject_string(cert) if cert is not None else None,
        was_smime=state.layers > 0,
        signer_addresses=cert_addresses(cert) if cert is not None else (),
        signer_fingerprint=fingerprint(cert) if cert is not None else None,
        decrypted_with=state.encrypted_with,
        reason=check.reason if check else "",
    )


@functools.lru_cache(maxsize=16)
def _identity(key_pem: bytes, cert_pem: bytes) -> Identity:
    return load_identity(key_pem, cert_pem)


@functools.lru_cache(maxsize=1024)
def _cert(pem: bytes) -> x509.Certificate:
    return load_certs(pem)[0]


def unwrap_pems(
    raw: bytes,
    identity_pems: Sequence[tuple[bytes, bytes]],
    known_cert_pems: Sequence[bytes],
) -> tuple[bytes, dict[str, object]]:
    """unwrap for a worker process: PEM in; message bytes and the facts (plain data) out."""
    result = unwrap(
        raw,
        identities=[_identity(k, c) for k, c in identity_pems],
        known_certs=[_cert(p) for p in known_cert_pems],
    )
    facts: dict[str, object] = {
        "encryption": result.encryption, "signature": result.signature,
        "signer": result.signer, "was_smime": result.was_smime,
        "signer_addresses": list(result.signer_addresses),
        "signer_fingerprint": result.signer_fingerprint,
        "decrypted_with": result.decrypted_with, "reason": result.reason,
    }
    return result.raw, facts
