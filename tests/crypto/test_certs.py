"""Certificates: the hub's own, vetting partners' at import, and key files on disk."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mailhub.crypto.certs import (
    SecretExists,
    cert_info,
    check_partner_cert,
    load_certs,
    load_identity,
    load_identity_file,
    write_secret,
)
from mailhub.crypto.selfsigned import generate_smime_identity, generate_tls_identity
from mailhub.errors import KeyImportError

CORPUS = Path(__file__).resolve().parents[2] / ".." / "shared" / "conformance" / "rt-crypt" / "smime"
KEYS = CORPUS / "keys"


@pytest.fixture(scope="module")
def partner() -> tuple[bytes, bytes]:
    return generate_smime_identity("doc@clinic-a.example", "Dr Clinic A")


def _cert(
    *, key: object | None = None, email: str | None = "x@clinic.example", ca: bool = False,
    key_usage: x509.KeyUsage | None = None, days: tuple[int, int] = (-1, 30),
) -> bytes:
    """A throwaway certificate with exactly the property a test needs."""
    key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())  # type: ignore[union-attr]
        .not_valid_before(now + dt.timedelta(days=days[0]))
        .not_valid_after(now + dt.timedelta(days=days[1]))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
    )
    if email:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]), False)
    if key_usage:
        builder = builder.add_extension(key_usage, True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def test_smime_identity_has_the_extensions_mail_clients_need(partner: tuple[bytes, bytes]) -> None:
    key_pem, cert_pem = partner
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.EMAIL_PROTECTION in eku
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == ["doc@clinic-a.example"]
    cert.verify_directly_issued_by(cert)
    info = cert_info(cert)
    assert info.addresses == ("doc@clinic-a.example",) and info.can_encrypt and not info.is_ca
    assert info.subject == "CN=Dr Clinic A" and len(info.fingerprint) == 64
    assert (info.not_after - info.not_before).days >= 1094


def test_tls_identity_names_hosts_and_loopback() -> None:
    _key_pem, cert_pem = generate_tls_identity(["mail.medvoyage.example", "localhost"])
    cert = x509.load_pem_x509_certificate(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.medvoyage.example", "localhost"]
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku


def test_write_secret_is_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        target = tmp_path / "keys" / "hub.key"
        write_secret(target, b"secret")
    finally:
        os.umask(old)
    assert target.read_bytes() == b"secret"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700
    with pytest.raises(SecretExists):
        write_secret(target, b"other")
    assert target.read_bytes() == b"secret"
    write_secret(target, b"replaced", overwrite=True)
    assert target.read_bytes() == b"replaced"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == ["hub.key"]  # no temp files left


def test_load_certs_reads_text_dump_before_pem_and_der() -> None:
    certs = load_certs((KEYS / "root@example.com.crt").read_bytes())
    assert len(certs) == 1
    info = cert_info(certs[0])
    assert info.addresses == ("root@example.com",)  # v1 cert: only the subject emailAddress
    assert load_certs(certs[0].public_bytes(serialization.Encoding.DER)) == certs
    with pytest.raises(KeyImportError):
        load_certs(b"not a certificate")


def test_partner_cert_from_corpus_is_accepted_with_its_address() -> None:
    info, chain = check_partner_cert(
        (KEYS / "sender@example.com.crt").read_bytes(), expected_address="Sender@Example.com"
    )
    assert info.addresses == ("sender@example.com",)
    assert "CN=sender" in info.subject and len(chain) == 1


def test_chain_file_puts_the_leaf_first() -> None:
    data = (KEYS / "demoCA" / "cacert.pem").read_bytes() + (KEYS / "sender@example.com.crt").read_bytes()
    info, chain = check_partner_cert(data)
    assert info.addresses == ("sender@example.com",) and len(chain) == 2


@pytest.mark.parametrize("name", ["sender@example.com.pem", "sender@example.com.key"])
def test_private_key_files_are_refused(name: str) -> None:
    with pytest.raises(KeyImportError, match="never imports a partner's private key"):
        check_partner_cert((KEYS / name).read_bytes())


def test_der_private_key_and_pkcs12_are_refused(partner: tuple[bytes, bytes]) -> None:
    key = serialization.load_pem_private_key(partner[0], None)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    p12 = pkcs12.serialize_key_and_certificates(
        b"x", key, x509.load_pem_x509_certificate(partner[1]), None,  # type: ignore[arg-type]
        serialization.BestAvailableEncryption(b"pw"),
    )
    for data in (der, p12):
        with pytest.raises(KeyImportError, match="private key"):
            check_partner_cert(data)


def test_expired_certificate_is_refused() -> None:
    with pytest.raises(KeyImportError, match="expired"):
        check_partner_cert((KEYS / "dianne@skoll.ca.crt").read_bytes())


def test_not_yet_valid_certificate_is_refused() -> None:
    with pytest.raises(KeyImportError, match="not valid before"):
        check_partner_cert(_cert(days=(2, 30)))
    past = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    with pytest.raises(KeyImportError, match="not valid before"):
        check_partner_cert((KEYS / "sender@example.com.crt").read_bytes(), now=past)


def test_ca_certificate_as_leaf_is_refused() -> None:
    with pytest.raises(KeyImportError, match="CA certificate"):
        check_partner_cert((KEYS / "demoCA" / "cacert.pem").read_bytes())
    with pytest.raises(KeyImportError, match="CA certificate"):
        check_partner_cert(_cert(ca=True))


def test_certificate_without_address_is_refused() -> None:
    with pytest.raises(KeyImportError, match="no email address"):
        check_partner_cert(_cert(email=None))


def test_key_that_cannot_encrypt_is_refused() -> None:
    with pytest.raises(KeyImportError, match="cannot be used to encrypt"):
        check_partner_cert(_cert(key=ec.generate_private_key(ec.SECP256R1())))
    sign_only = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    with pytest.raises(KeyImportError, match="cannot be used to encrypt"):
        check_partner_cert(_cert(key_usage=sign_only))


def test_short_rsa_key_is_refused() -> None:
    short = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(KeyImportError, match="1024-bit RSA key, too short"):
        check_partner_cert(_cert(key=short))


def test_address_mismatch_is_refused(partner: tuple[bytes, bytes]) -> None:
    with pytest.raises(KeyImportError, match="not someone@else.example"):
        check_partner_cert(partner[1], expected_address="someone@else.example")


def test_own_identity_in_one_file_in_two_files_and_pkcs12(
    tmp_path: Path, partner: tuple[bytes, bytes]
) -> None:
    key_pem, cert_pem = partner
    (tmp_path / "both.pem").write_bytes(key_pem + cert_pem)
    (tmp_path / "k.pem").write_bytes(key_pem)
    (tmp_path / "c.pem").write_bytes(cert_pem)
    one = load_identity_file(tmp_path / "both.pem")
    two = load_identity_file(tmp_path / "k.pem", tmp_path / "c.pem")
    assert one.fingerprint == two.fingerprint == cert_info(one.cert).fingerprint
    p12 = pkcs12.serialize_key_and_certificates(
        b"hub", one.key, one.cert, None, serialization.BestAvailableEncryption(b"pw")
    )
    (tmp_path / "hub.p12").write_bytes(p12)
    assert load_identity_file(tmp_path / "hub.p12", password=b"pw").fingerprint == one.fingerprint
    again = load_identity(one.key_pem(), one.cert_pem())
    assert again.fingerprint == one.fingerprint
    corpus = load_identity_file(KEYS / "root@example.com.pem")
    assert corpus.addresses == ("root@example.com",)


def test_own_identity_with_a_foreign_certificate_is_refused(partner: tuple[bytes, bytes]) -> None:
    other_key, _ = generate_smime_identity("hub@medvoyage.example", "Hub")
    with pytest.raises(KeyImportError, match="does not match"):
        load_identity(other_key, partner[1])
    with pytest.raises(KeyImportError, match="no PEM private key"):
        load_identity(partner[1], partner[1])
