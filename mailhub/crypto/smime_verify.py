"""Verification of CMS SignedData (RFC 5652), which `cryptography` does not offer.

asn1crypto parses the structure (BER as clients send it); cryptography checks the signature.
Checks, in order: the messageDigest attribute against the content's digest, the signature over
the DER of the signed attributes (re-tagged as SET OF), then trust: the signer certificate is
one of the partner certificates the hub imported, or chains to one of them, and is in date.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from asn1crypto import cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa

from mailhub.crypto.certs import fingerprint, is_ca, time_valid
from mailhub.errors import DecryptionFailed

log = logging.getLogger("mailhub.crypto")

Status = Literal["verified", "invalid", "unknown-key"]
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1, "sha224": hashes.SHA224, "sha256": hashes.SHA256,
    "sha384": hashes.SHA384, "sha512": hashes.SHA512,
    "sha3_256": hashes.SHA3_256, "sha3_384": hashes.SHA3_384, "sha3_512": hashes.SHA3_512,
}
_MAX_CHAIN = 8


@dataclass(frozen=True)
class SignerCheck:
    """The outcome for one CMS signature; `cert` is the signer certificate when found."""

    status: Status
    cert: x509.Certificate | None
    reason: str


class _Mismatch(Exception):
    """The signature does not match the content (-> "invalid")."""


@functools.lru_cache(maxsize=4096)
def _asn1_cert(der: bytes) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(der)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _hash(name: str) -> hashes.HashAlgorithm:
    try:
        return _HASHES[name]()
    except KeyError:
        raise _Mismatch(f"digest algorithm {name} is not accepted") from None


def find_cert(
    sid: cms.SignerIdentifier, pool: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    """The certificate named by the SignerIdentifier: issuer+serial, or subject key id."""
    if sid.name == "issuer_and_serial_number":
        serial = sid.chosen["serial_number"].native
        issuer = sid.chosen["issuer"]
        for cert in pool:
            if cert.serial_number == serial and _asn1_cert(_der(cert)).issuer == issuer:
                return cert
        return None
    ski = sid.chosen.native
    for cert in pool:
        try:
            ext = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        except (x509.ExtensionNotFound, ValueError):
            continue
        if ext.value.digest == ski:
            return cert
    return None


def _check_signature(
    cert: x509.Certificate, signer_info: cms.SignerInfo, data: bytes, digest_name: str
) -> None:
    """Raise _Mismatch unless `signature` over `data` verifies with the cert's key."""
    sig_alg = signer_info["signature_algorithm"]
    signature = signer_info["signature"].native
    key = cert.public_key()
    try:
        kind = sig_alg.signature_algo
    except ValueError as exc:
        raise _Mismatch(f"unknown signature algorithm: {exc}") from exc
    try:
        if kind == "rsassa_pkcs1v15" and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, padding.PKCS1v15(), _hash(digest_name))
        elif kind == "rsassa_pss" and isinstance(key, rsa.RSAPublicKey):
            params = sig_alg["parameters"]
            pss_hash = _hash(params["hash_algorithm"]["algorithm"].native)
            mgf_hash = _hash(params["mask_gen_algorithm"]["parameters"]["algorithm"].native)
            pad = padding.PSS(padding.MGF1(mgf_hash), params["salt_length"].native)
            key.verify(signature, data, pad, pss_hash)
        elif kind == "ecdsa" and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(_hash(digest_name)))
        elif kind in ("ed25519", "ed448") and isinstance(
            key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
        ):
            key.verify(signature, data)
        else:
            raise _Mismatch(f"signature algorithm {kind} does not fit the signer's key")
    except InvalidSignature:
        raise _Mismatch("the signature does not match the signed data") from None
    except (UnsupportedAlgorithm, ValueError, TypeError) as exc:
        raise _Mismatch(f"signature could not be checked: {exc}") from exc


def _signed_attrs_der(attrs: cms.CMSAttributes) -> bytes:
    """The signed attributes as signed: their encoding with the [0] tag replaced by SET OF."""
    encoded = attrs.dump()
    if encoded[:1] == b"\xa0" and encoded[1:2] != b"\x80":
        return b"\x31" + encoded[1:]
    return attrs.untag().dump(force=True)


def _check_attrs(attrs: cms.CMSAttributes, content_type: str, digest: bytes) -> None:
    """messageDigest must equal the content digest; contentType must match eContentType."""
    found: dict[str, object] = {}
    for attr in attrs:
        name = attr["type"].native
        if name in ("message_digest", "content_type"):
            values = attr["values"]
            if len(values) != 1 or name in found:
                raise _Mismatch(f"signed attribute {name} must occur once with one value")
            found[name] = values[0].native
    if found.get("message_digest") != digest:
        raise _Mismatch("the content does not match its signature (message digest differs)")
    if found.get("content_type") != content_type:
        raise _Mismatch("the signed content type does not match the content")


def _issuer_in(
    cert: x509.Certificate, pool: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    for cand in pool:
        if cand.subject != cert.issuer or cand is cert or not is_ca(cand):
            continue
        try:
            cert.verify_directly_issued_by(cand)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            continue
        return cand
    return None


def is_trusted(
    signer: x509.Certificate,
    message_certs: Sequence[x509.Certificate],
    known_certs: Sequence[x509.Certificate],
    now: dt.datetime | None = None,
) -> bool:
    """Signer is a known certificate, or chains to one through valid CA certs; all in date."""
    known = {fingerprint(c) for c in known_certs}
    pool = [*message_certs, *known_certs]
    path = [signer]
    current = signer
    while fingerprint(current) not in known:
        if len(path) > _MAX_CHAIN:
            return False
        issuer = _issuer_in(current, pool)
        if issuer is None or issuer in path:
            return False
        path.append(issuer)
        current = issuer
    return all(time_valid(c, now) for c in path)


def _check_signer(
    signer_info: cms.SignerInfo,
    content: bytes,
    content_type: str,
    message_certs: Sequence[x509.Certificate],
    known_certs: Sequence[x509.Certificate],
    now: dt.datetime | None,
) -> SignerCheck:
    cert = find_cert(signer_info["sid"], [*message_certs, *known_certs])
    if cert is None:
        return SignerCheck("unknown-key", None, "the signer's certificate is not available")
    digest_name = signer_info["digest_algorithm"]["algorithm"].native
    try:
        _hash(digest_name)
        attrs = signer_info["signed_attrs"]
        if isinstance(attrs, core.Void):
            if content_type != "data":
                raise _Mismatch("signed attributes are required for this content type")
            data = content
        else:
            _check_attrs(attrs, content_type, hashlib.new(digest_name, content).digest())
            data = _signed_attrs_der(attrs)
        _check_signature(cert, signer_info, data, digest_name)
    except _Mismatch as exc:
        return SignerCheck("invalid", cert, str(exc))
    if is_trusted(cert, message_certs, known_certs, now):
        return SignerCheck("verified", cert, "signature valid, signer known")
    return SignerCheck("unknown-key", cert, "valid signature by a certificate the hub does not know")


def _message_certs(signed: cms.SignedData) -> list[x509.Certificate]:
    out: list[x509.Certificate] = []
    for choice in signed["certificates"] or []:
        if choice.name != "certificate":
            continue
        try:
            out.append(x509.load_der_x509_certificate(choice.chosen.dump()))
        except ValueError:
            log.info("skipping an unreadable certificate in a CMS message")
    return out


def verify_signed_data(
    der: bytes,
    detached_content: bytes | None,
    known_certs: Sequence[x509.Certificate],
    now: dt.datetime | None = None,
) -> tuple[SignerCheck, bytes]:
    """Check a CMS SignedData blob; returns the best signer outcome and the signed content.

    Malformed input raises DecryptionFailed; a signature that does not match is "invalid".
    """
    try:
        info = cms.ContentInfo.load(der)
        if info["content_type"].native != "signed_data":
            raise DecryptionFailed(
                f"expected CMS signed-data, found {info['content_type'].native}"
            )
        signed = info["content"]
        encap = signed["encap_content_info"]
        content_type = encap["content_type"].native
        embedded = encap["content"]
        content = detached_content if isinstance(embedded, core.Void) else bytes(embedded)
        if content is None:
            raise DecryptionFailed("the signed message lacks its signed content")
        signer_infos = list(signed["signer_infos"])
        if not signer_infos:
            raise DecryptionFailed("the CMS signed-data carries no signature (certificates only)")
        certs = _message_certs(signed)
        checks = [
            _check_signer(si, content, content_type, certs, known_certs, now)
            for si in signer_infos
        ]
    except DecryptionFailed:
        raise
    except Exception as exc:  # asn1crypto raises many types on malformed BER
        raise DecryptionFailed(f"malformed S/MIME signature: {exc}") from exc
    for wanted in ("verified", "invalid", "unknown-key"):
        for check in checks:
            if check.status == wanted:
                return check, content
    return checks[0], content
