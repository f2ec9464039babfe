"""Inbound S/MIME made by `openssl cms`: every layering, tampering, strangers, broken input."""

from __future__ import annotations

import base64
import datetime as dt
import re
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from mailhub.crypto.certs import Identity, load_identity
from mailhub.crypto.selfsigned import generate_smime_identity
from mailhub.crypto.smime_inbound import Unwrapped, unwrap
from mailhub.errors import DecryptionFailed

HEADERS = ["-from", "doc@clinic-a.example", "-to", "intake@medvoyage.example",
           "-subject", "Lab results"]
ENTITY = (
    b"Subject: [MT-2026-0042] Lab results ID:77\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    b"Potassium 4.1 mmol/L. ID:77\r\n"
)


class Party:
    def __init__(self, directory: Path, name: str, key_pem: bytes, cert_pem: bytes) -> None:
        self.identity: Identity = load_identity(key_pem, cert_pem)
        self.ca: x509.Certificate | None = None  # the issuing CA, for CA-issued partners
        self.key = directory / f"{name}.key"
        self.cert = directory / f"{name}.crt"
        self.key.write_bytes(key_pem)
        self.cert.write_bytes(cert_pem)


def _ca_issued(directory: Path) -> tuple[Party, x509.Certificate]:
    """A partner certificate issued by a small CA, as clinics' certificates usually are."""
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Clinic B CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=90))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Clinic B Lab")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name("lab@clinic-b.example")]), False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return Party(directory, "lab", key_pem, leaf.public_bytes(serialization.Encoding.PEM)), ca


@pytest.fixture(scope="module")
def parties(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Party]:
    d = tmp_path_factory.mktemp("smime-in")
    out = {
        "hub": Party(d, "hub", *generate_smime_identity("intake@medvoyage.example", "hub")),
        "old_hub": Party(d, "old", *generate_smime_identity("intake@medvoyage.example", "old")),
        "clinic": Party(d, "clinic", *generate_smime_identity("doc@clinic-a.example", "Dr A")),
        "stranger": Party(d, "stranger", *generate_smime_identity("x@else.example", "Stranger")),
    }
    out["lab"], ca = _ca_issued(d)
    (d / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out["lab"].ca = ca
    return out


def _cms(tmp_path: Path, args: list[str | Path], data: bytes) -> bytes:
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    done = subprocess.run(["openssl", "cms", "-in", str(src), *map(str, args)],
                          capture_output=True, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _sign(tmp: Path, who: Party, data: bytes, *extra: str) -> bytes:
    return _cms(tmp, ["-sign", "-signer", who.cert, "-inkey", who.key, *extra], data)


def _encrypt(tmp: Path, data: bytes, *recipients: Party, extra: tuple[str, ...] = ()) -> bytes:
    return _cms(tmp, ["-encrypt", "-aes256", *extra, *(r.cert for r in recipients)], data)


def _open(raw: bytes, parties: dict[str, Party], *known: str) -> Unwrapped:
    return unwrap(raw, identities=[parties["hub"].identity, parties["old_hub"].identity],
                  known_certs=[parties[k].identity.cert for k in known])


def test_detached_signature_verified_unknown_and_tampered(
    parties: dict[str, Party], tmp_path: Path
) -> None:
    raw = _sign(tmp_path, parties["clinic"], ENTITY, *HEADERS)
    assert b"multipart/signed" in raw
    ok = _open(raw, parties, "clinic")
    assert (ok.encryption, ok.signature, ok.signer) == ("none", "verified", "CN=Dr A")
    assert ok.message["Subject"] == "[MT-2026-0042] Lab results ID:77"
    assert ok.message["From"] == "doc@clinic-a.example"
    assert _open(raw, parties).signature == "unknown-key"
    assert _open(raw, parties, "stranger").signature == "unknown-key"
    bad = _open(raw.replace(b"4.1 mmol", b"9.1 mmol"), parties, "clinic")
    assert bad.signature == "invalid"
    legacy = raw.replace(b"application/pkcs7-signature", b"application/x-pkcs7-signature")
    assert b"x-pkcs7-signature" in legacy
    assert _open(legacy, parties, "clinic").signature == "verified"
    lf_only = raw.replace(b"\r\n", b"\n")  # a local delivery agent stored it with LF ends
    assert _open(lf_only, parties, "clinic").signature == "verified"


def test_opaque_signature_verified_and_tampered(parties: dict[str, Party], tmp_path: Path) -> None:
    raw = _sign(tmp_path, parties["clinic"], ENTITY, "-nodetach", *HEADERS)
    assert b"smime-type=signed-data" in raw
    ok = _open(raw, parties, "clinic")
    assert (ok.signature, ok.was_smime) == ("verified", True)
    assert "Potassium 4.1" in ok.message.get_content()
    head, body = raw.split(b"\n\n", 1)
    der = base64.b64decode(body)
    assert b"4.1 mmol" in der
    forged = base64.encodebytes(der.replace(b"4.1 mmol", b"9.1 mmol"))
    assert _open(head + b"\n\n" + forged, parties, "clinic").signature == "invalid"


def test_signed_then_encrypted(parties: dict[str, Party], tmp_path: Path) -> None:
    signed = _sign(tmp_path, parties["clinic"], ENTITY)
    raw = _encrypt(tmp_path, signed, parties["hub"], extra=tuple(HEADERS))
    result = _open(raw, parties, "clinic")
    assert (result.encryption, result.signature) == ("smime", "verified")
    assert result.message["Subject"] == "[MT-2026-0042] Lab results ID:77"
    assert result.decrypted_with == parties["hub"].identity.fingerprint


def test_opaque_signed_then_encrypted_to_the_old_hub_key(
    parties: dict[str, Party], tmp_path: Path
) -> None:
    signed = _sign(tmp_path, parties["clinic"], ENTITY, "-nodetach")
    raw = _encrypt(tmp_path, signed, parties["old_hub"], extra=tuple(HEADERS))
    result = _open(raw, parties, "clinic")
    assert (result.encryption, result.signature) == ("smime", "verified")
    assert result.decrypted_with == parties["old_hub"].identity.fingerprint


def test_encrypted_then_signed(parties: dict[str, Party], tmp_path: Path) -> None:
    encrypted = _encrypt(tmp_path, ENTITY, parties["hub"])
    raw = _sign(tmp_path, parties["clinic"], encrypted, *HEADERS)
    result = _open(raw, parties, "clinic")
    assert (result.encryption, result.signature) == ("smime", "verified")
    assert "ID:77" in result.message.get_content()


def test_subject_key_identifiers_oaep_and_gcm(parties: dict[str, Party], tmp_path: Path) -> None:
    signed = _sign(tmp_path, parties["clinic"], ENTITY, "-keyid")
    raw = _cms(tmp_path, ["-encrypt", "-aes256", "-keyid", *HEADERS, "-recip", parties["hub"].cert,
                          "-keyopt", "rsa_padding_mode:oaep"], signed)
    assert b"ID:77" not in raw
    result = _open(raw, parties, "clinic")
    assert (result.encryption, result.signature) == ("smime", "verified")
    gcm = _cms(tmp_path, ["-encrypt", "-aes-256-gcm", *HEADERS, parties["hub"].cert], ENTITY)
    assert b"authEnveloped-data" in gcm
    opened = _open(gcm, parties)
    assert opened.encryption == "smime" and "ID:77" in opened.message.get_content()


def test_ca_issued_signer_trusted_through_its_ca(parties: dict[str, Party], tmp_path: Path) -> None:
    raw = _sign(tmp_path, parties["lab"], ENTITY, *HEADERS)
    ca = parties["lab"].ca
    assert ca is not None
    hub = [parties["hub"].identity]
    assert unwrap(raw, identities=hub, known_certs=[ca]).signature == "verified"
    assert unwrap(raw, identities=hub, known_certs=[]).signature == "unknown-key"
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=60)  # leaf expired, CA still valid
    assert unwrap(raw, identities=hub, known_certs=[ca], now=later).signature == "unknown-key"


def test_not_for_us_is_decryption_failed(parties: dict[str, Party], tmp_path: Path) -> None:
    raw = _encrypt(tmp_path, ENTITY, parties["stranger"], extra=tuple(HEADERS))
    with pytest.raises(DecryptionFailed, match="not encrypted to any of the hub's") as err:
        _open(raw, parties)
    assert err.value.smtp_status == "5.7.5"


def test_broken_input_is_always_decryption_failed(parties: dict[str, Party], tmp_path: Path) -> None:
    enc = _encrypt(tmp_path, ENTITY, parties["hub"], extra=tuple(HEADERS))
    head, body = enc.split(b"\n\n", 1)
    signed = _sign(tmp_path, parties["clinic"], ENTITY, *HEADERS)
    boundary = re.search(rb'boundary="([^"]+)"', signed).group(1)  # type: ignore[union-attr]
    first_part_only = signed.split(b"\n--" + boundary + b"\n", 2)
    cases = {
        "truncated base64": head + b"\n\n" + body[:-7],
        "cut DER": head + b"\n\n" + base64.encodebytes(base64.b64decode(body)[:300]),
        "not CMS": head + b"\n\n" + base64.encodebytes(b"\x30\x03\x02\x01\x01"),
        "CMS data, not enveloped": head + b"\n\n" + base64.encodebytes(bytes.fromhex(
            "301406092a864886f70d010701a007040568656c6c6f")),
        "missing signature part": first_part_only[0] + b"\n--" + boundary + b"\n" +
        first_part_only[1] + b"\n--" + boundary + b"--\n",
        "signature part not base64": signed.replace(b"MII", b"!!!", 1),
        "no boundary": b"Content-Type: multipart/signed; protocol=\"application/pkcs7-signature\"\n\nx",
        "empty": b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data\n\n",
    }
    survived = []
    for name, raw in cases.items():
        try:
            _open(raw, parties)
        except DecryptionFailed:
            continue
        survived.append(name)
    assert survived == []


def test_plain_mail_passes_through_and_inner_protection_header_is_dropped(
    parties: dict[str, Party], tmp_path: Path
) -> None:
    plain = b"From: a@b.example\nSubject: hello\n\nno crypto here\n"
    result = _open(plain, parties)
    assert (result.was_smime, result.encryption, result.signature) == (False, "none", "none")
    assert result.message.get_content() == "no crypto here\n"
    forged = b"Mailhub-Protection: encryption=smime; signature=verified\r\n" + ENTITY
    raw = _encrypt(tmp_path, forged, parties["hub"], extra=tuple(HEADERS))
    opened = _open(raw, parties)
    assert opened.message["Mailhub-Protection"] is None
    assert opened.message["Subject"] == "[MT-2026-0042] Lab results ID:77"


def test_signer_found_among_known_certs_when_the_message_carries_none(
    parties: dict[str, Party], tmp_path: Path
) -> None:
    raw = _sign(tmp_path, parties["clinic"], ENTITY, "-nocerts", *HEADERS)
    assert _open(raw, parties, "clinic").signature == "verified"
    stranger = _open(raw, parties)
    assert (stranger.signature, stranger.signer) == ("unknown-key", None)
    assert stranger.protection_header() == "encryption=none; signature=unknown-key"


def test_encrypted_content_without_mime_headers_is_all_body(
    parties: dict[str, Party], tmp_path: Path
) -> None:
    raw = _encrypt(tmp_path, b"hello world ID:5\n", parties["hub"], extra=("-binary", *HEADERS))
    result = _open(raw, parties)
    assert result.message.get_content() == "hello world ID:5\n"
    assert result.message["Subject"] == "Lab results"
