"""X.509 material for S/MIME and TLS: vetting partners' certificates, loading identities, writing secrets.

Partner certificates are vetted at import so that the outbound path can trust what is stored:
anything that could not be used to encrypt mail to that partner is refused with a reason.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs7, pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Key files are written by the durable-file helpers; re-exported here for key management.
from mailhub.crypto.atrest import SecretExists as SecretExists
from mailhub.crypto.atrest import fsync_dir as fsync_dir
from mailhub.crypto.atrest import write_secret as write_secret
from mailhub.errors import KeyImportError
from mailhub.fileaccess import read_user_bytes

log = logging.getLogger("mailhub.crypto")

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)
_CERT_LABELS = {b"CERTIFICATE", b"X509 CERTIFICATE", b"TRUSTED CERTIFICATE"}
_PKCS7_LABELS = {b"PKCS7", b"CMS"}
_PKCS12_BAG_ARC = bytes.fromhex("2a864886f70d010c0a01")  # 1.2.840.113549.1.12.10.1 (PKCS#12 bags)
MIN_RSA_BITS = 2048  # what the hub will encrypt to (NIST SP 800-131A: 1024 is disallowed)
_HINT_PARTNER = "ask the partner for their S/MIME certificate (PEM or DER, public part only)"


@dataclass(frozen=True)
class CertInfo:
    """What the hub needs to know about a certificate, as plain data."""

    fingerprint: str
    subject: str
    addresses: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    is_ca: bool
    can_encrypt: bool
    expired: bool
    key_bits: int = 0  # RSA modulus length (0: not RSA)


@dataclass(frozen=True)
class Identity:
    """One of the hub's own S/MIME identities: private key, certificate and its chain."""

    key: rsa.RSAPrivateKey
    cert: x509.Certificate
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)

    @property
    def addresses(self) -> tuple[str, ...]:
        return cert_addresses(self.cert)

    def key_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM, for handing the identity to a worker process."""
        return private_key_pem(self.key)

    def cert_pem(self) -> bytes:
        """The certificate followed by its chain, PEM."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self.cert, *self.chain))


# --- small pure helpers -------------------------------------------------------------------


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def private_key_pem(key: rsa.RSAPrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM (written 0600 by ``write_secret``, or piped to a worker)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint as lower-case hex, the hub's id for a certificate."""
    return cert.fingerprint(hashes.SHA256()).hex()


def subject_string(cert: x509.Certificate) -> str:
    """The subject as an RFC 4514 string (what Mailhub-Protection's signer= carries)."""
    return cert.subject.rfc4514_string()


def cert_addresses(cert: x509.Certificate) -> tuple[str, ...]:
    """Email addresses from SAN rfc822Name and the subject's emailAddress, de-duplicated."""
    found: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        found.extend(san.get_values_for_type(x509.RFC822Name))
    except (x509.ExtensionNotFound, ValueError):
        pass
    for attr in cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS):
        if isinstance(attr.value, str):
            found.append(attr.value)
    seen: dict[str, str] = {}
    for addr in found:
        seen.setdefault(addr.strip().lower(), addr.strip())
    return tuple(v for v in seen.values() if v)


def _ext(cert: x509.Certificate, cls: type[x509.ExtensionType]) -> x509.ExtensionType | None:
    try:
        return cert.extensions.get_extension_for_class(cls).value
    except (x509.ExtensionNotFound, ValueError):
        return None


def is_ca(cert: x509.Certificate) -> bool:
    """CA as OpenSSL judges it: basicConstraints CA, keyCertSign, or a self-signed v1 cert."""
    bc = _ext(cert, x509.BasicConstraints)
    if isinstance(bc, x509.BasicConstraints):
        return bc.ca
    ku = _ext(cert, x509.KeyUsage)
    if isinstance(ku, x509.KeyUsage) and ku.key_cert_sign:
        return True
    if cert.version == x509.Version.v1 and cert.subject == cert.issuer:
        try:
            cert.verify_directly_issued_by(cert)
            return True
        except (ValueError, TypeError, InvalidSignature):
            return False
    return False


def can_encrypt(cert: x509.Certificate) -> bool:
    """RSA key (we encrypt with RSA key transport) whose keyUsage, if any, allows it."""
    if not isinstance(cert.public_key(), rsa.RSAPublicKey):
        return False
    ku = _ext(cert, x509.KeyUsage)
    return not isinstance(ku, x509.KeyUsage) or ku.key_encipherment


def for_email(cert: x509.Certificate) -> bool:
    """False when an extendedKeyUsage is present and excludes email protection."""
    eku = _ext(cert, x509.ExtendedKeyUsage)
    wanted = (ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE)
    return not isinstance(eku, x509.ExtendedKeyUsage) or any(oid in wanted for oid in eku)


def time_valid(cert: x509.Certificate, now: dt.datetime | None = None) -> bool:
    now = now or _utcnow()
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def cert_info(cert: x509.Certificate, now: dt.datetime | None = None) -> CertInfo:
    now = now or _utcnow()
    return CertInfo(
        fingerprint=fingerprint(cert), subject=subject_string(cert),
        addresses=cert_addresses(cert), not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc, is_ca=is_ca(cert), can_encrypt=can_encrypt(cert),
        expired=now > cert.not_valid_after_utc, key_bits=_rsa_bits(cert),
    )


def _rsa_bits(cert: x509.Certificate) -> int:
    key = cert.public_key()
    return key.key_size if isinstance(key, rsa.RSAPublicKey) else 0


# --- loading ------------------------------------------------------------------------------


def _pem_blocks(data: bytes) -> list[tuple[bytes, bytes]]:
    return [(m.group(1), m.group(0)) for m in _PEM_BLOCK.finditer(data)]


def has_private_key(data: bytes) -> bool:
    """True when the bytes hold a private key in any form we can recognise (PEM, DER, PKCS#12)."""
    if b"PRIVATE KEY-----" in data:
        return True
    if b"-----BEGIN" in data:
        return False
    try:
        serialization.load_der_private_key(data, None)
        return True
    except TypeError:  # an encrypted DER private key
        return True
    except Exception:  # any parse failure means "not a DER key"
        pass
    try:
        key, _cert, _extra = pkcs12.load_key_and_certificates(data, None)
        return key is not None
    except Exception:  # not PKCS#12, or protected by a password
        return _PKCS12_BAG_ARC in data


def load_certs(pem_or_der: bytes) -> list[x509.Certificate]:
    """Every certificate in PEM (text dumps before blocks are fine), DER, or a PKCS#7 bundle."""
    certs: list[x509.Certificate] = []
    blocks = _pem_blocks(pem_or_der)
    try:
        if blocks:
            for label, block in blocks:
                if label in _CERT_LABELS:
                    if label != b"CERTIFICATE":
                        block = block.replace(label, b"CERTIFICATE")
                    certs.append(x509.load_pem_x509_certificate(block))
                elif label in _PKCS7_LABELS:
                    certs.extend(pkcs7.load_pem_pkcs7_certificates(block))
        else:
            try:
                certs.append(x509.load_der_x509_certificate(pem_or_der))
            except ValueError:
                certs.extend(pkcs7.load_der_pkcs7_certificates(pem_or_der))
    except ValueError as exc:
        raise KeyImportError(f"unreadable certificate: {exc}", hint=_HINT_PARTNER) from exc
    if not certs:
        raise KeyImportError("no X.509 certificate found in the file", hint=_HINT_PARTNER)
    return certs


def _leaf_first(certs: list[x509.Certificate]) -> list[x509.Certificate]:
    """Order a bag of certificates leaf first: one that issued none of the others."""
    if len(certs) < 2:
        return list(certs)

    def issued_another(cert: x509.Certificate) -> bool:
        return any(o is not cert and o.issuer == cert.subject for o in certs)

    leaves = [c for c in certs if not issued_another(c)]
    leaves = [c for c in leaves if not is_ca(c)] or leaves
    leaf = leaves[0] if leaves else certs[0]
    return [leaf, *(c for c in certs if c is not leaf)]


def partner_refusal(
    info: CertInfo, usable_for_email: bool, expected_address: str | None, now: dt.datetime
) -> tuple[str, str] | None:
    """Why a partner certificate cannot be imported, as (message, hint); None if it can."""
    who = f"certificate {info.subject}"
    if info.is_ca:
        return f"{info.subject} is a CA certificate, not a person's or mailbox's", _HINT_PARTNER
    if now < info.not_before:
        return (f"{who} is not valid before {info.not_before.isoformat()}",
                "check the machine's clock or ask the partner for a current certificate")
    if info.expired:
        return (f"{who} expired on {info.not_after.isoformat()}",
                "ask the partner for their renewed certificate")
    if not info.addresses:
        return f"{who} names no email address", _HINT_PARTNER
    if not (info.can_encrypt and usable_for_email):
        return (f"{who} cannot be used to encrypt email to it (the hub needs an RSA key allowed "
                "for key encipherment and email protection)",
                "ask the partner for an RSA S/MIME encryption certificate")
    if info.key_bits < MIN_RSA_BITS:
        return (f"{who} has a {info.key_bits}-bit RSA key, too short to protect health data "
                f"(at least {MIN_RSA_BITS} bits)",
                "ask the partner for a certificate with an RSA-2048 or longer key")
    if expected_address and expected_address.lower() not in {a.lower() for a in info.addresses}:
        return (f"certificate is for {', '.join(info.addresses)}, not {expected_address}",
                "import the certificate that belongs to this address")
    return None


def check_partner_cert(
    data: bytes, expected_address: str | None = None, now: dt.datetime | None = None
) -> tuple[CertInfo, list[x509.Certificate]]:
    """Vet a partner's certificate file for import; refuse anything unusable, saying why."""
    if has_private_key(data):
        raise KeyImportError(
            "the file contains a private key; the hub never imports a partner's private key",
            hint="export only the certificate (public part) and import that",
        )
    now = now or _utcnow()
    chain = _leaf_first(load_certs(data))
    info = cert_info(chain[0], now)
    problem = partner_refusal(info, for_email(chain[0]), expected_address, now)
    if problem:
        log.info("refused a partner certificate: %s", problem[0])
        raise KeyImportError(problem[0], hint=problem[1])
    return info, chain


def load_identity(key_pem: bytes, cert_pem: bytes, password: bytes | None = None) -> Identity:
    """The hub's own identity from PEM key and certificate(s); refuses a mismatched pair."""
    blocks = [b for label, b in _pem_blocks(key_pem) if label.endswith(b"PRIVATE KEY")]
    if not blocks:
        raise KeyImportError("no PEM private key found", hint="give a PEM (PKCS#8 or RSA) key")
    try:
        key = serialization.load_pem_private_key(blocks[0], password)
    except TypeError as exc:
        raise KeyImportError(
            "the private key is protected by a passphrase", hint="remove it with 'openssl pkey'"
        ) from exc
    except ValueError as exc:
        raise KeyImportError(f"unreadable private key: {exc}") from exc
    return _identity_from(key, load_certs(cert_pem))


def _identity_from(key: object, certs: list[x509.Certificate]) -> Identity:
    if not isinstance(key, rsa.RSAPrivateKey):
        raise KeyImportError(
            "only RSA keys can be the hub's S/MIME key (RSA key transport)",
            hint="use an RSA-2048 or larger key",
        )
    pub = key.public_key().public_numbers()
    matching = [c for c in certs if isinstance(c.public_key(), rsa.RSAPublicKey)
                and c.public_key().public_numbers() == pub]
    if not matching:
        raise KeyImportError(
            "the private key does not match the certificate",
            hint="give the certificate that was issued for this key",
        )
    cert = matching[0]
    return Identity(key=key, cert=cert, chain=tuple(c for c in certs if c is not cert))


def load_identity_file(
    path: str | os.PathLike[str],
    cert_path: str | os.PathLike[str] | None = None,
    password: bytes | None = None,
) -> Identity:
    """`keys import-own`: key and cert in one PEM file, as two files, or a PKCS#12 bundle."""
    data = read_user_bytes(path, "key file", KeyImportError)
    if cert_path is None and b"-----BEGIN" not in data:
        try:
            key, cert, extra = pkcs12.load_key_and_certificates(data, password)
        except (ValueError, TypeError) as exc:
            raise KeyImportError(f"unreadable key file {path}: {exc}") from exc
        if key is None or cert is None:
            raise KeyImportError(f"{path} holds no key with its certificate")
        return _identity_from(key, [cert, *extra])
    cert_data = (read_user_bytes(cert_path, "certificate file", KeyImportError)
                 if cert_path is not None else data)
    return load_identity(data, cert_data, password)
