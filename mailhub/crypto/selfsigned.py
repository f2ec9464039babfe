"""The hub's own self-signed certificates: its S/MIME identity and its listeners' TLS certificate.

Made by ``mailhub init`` (and by test fixtures), never stored in the repository: RSA-2048,
SHA-256, end-entity extensions for exactly one purpose each.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mailhub.crypto.certs import private_key_pem


def _new_rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _self_signed(
    key: rsa.RSAPrivateKey, name: x509.Name, days: int, exts: list[tuple[x509.ExtensionType, bool]]
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(secrets.randbits(126) + 1)
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    for ext, critical in exts:
        builder = builder.add_extension(ext, critical)
    return builder.sign(key, hashes.SHA256())


def _leaf_exts(
    eku: x509.ObjectIdentifier, san: x509.SubjectAlternativeName
) -> list[tuple[x509.ExtensionType, bool]]:
    """End-entity extensions: not a CA, signs and receives RSA key transport, one purpose."""
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=True,
        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False,
    )
    return [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (usage, True),
        (x509.ExtendedKeyUsage([eku]), False),
        (san, False),
    ]


def generate_smime_identity(address: str, common_name: str, days: int = 1095) -> tuple[bytes, bytes]:
    """A self-signed RSA-2048 S/MIME certificate for the hub: (key PEM, cert PEM)."""
    key = _new_rsa()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    san = x509.SubjectAlternativeName([x509.RFC822Name(address)])
    cert = _self_signed(key, name, days, _leaf_exts(ExtendedKeyUsageOID.EMAIL_PROTECTION, san))
    return private_key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def generate_tls_identity(hostnames: list[str]) -> tuple[bytes, bytes]:
    """A self-signed certificate for STARTTLS on the listeners: (key PEM, cert PEM)."""
    key = _new_rsa()
    names: list[x509.GeneralName] = []
    ips = {ipaddress.ip_address("127.0.0.1")}
    for host in hostnames:
        try:
            ips.add(ipaddress.ip_address(host))
        except ValueError:
            names.append(x509.DNSName(host))
    names.extend(x509.IPAddress(ip) for ip in sorted(ips, key=str))
    cn = next((h for h in hostnames if h), "localhost")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    san = x509.SubjectAlternativeName(names)
    cert = _self_signed(key, name, 825, _leaf_exts(ExtendedKeyUsageOID.SERVER_AUTH, san))
    return private_key_pem(key), cert.public_bytes(serialization.Encoding.PEM)
