"""Inbound S/MIME against real Thunderbird mail (RT's corpus, read from ../shared, not copied)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509

from mailhub.crypto.certs import Identity, load_certs, load_identity, load_identity_file
from mailhub.crypto.selfsigned import generate_smime_identity
from mailhub.crypto.smime_inbound import unwrap, unwrap_pems
from mailhub.errors import DecryptionFailed

CORPUS = Path(__file__).resolve().parents[2] / ".." / "shared" / "conformance" / "rt-crypt" / "smime"
MAILS = CORPUS / "mails"
KEYS = CORPUS / "keys"
SIGNED = ["1-signed.eml", "2-signed-attachment.eml", "3-signed-binary.eml"]
ENCRYPTED = ["4-encrypted-plain.eml", "5-encrypted-attachment.eml", "6-encrypted-binary.eml"]
BOTH = ["7-signed-encrypted-plain.eml", "8-signed-encrypted-attachment.eml",
        "9-signed-encrypted-binary.eml"]
SENDER_SUBJECT = (
    "1.2.840.113549.1.9.1=sender@example.com,CN=sender,O=Internet Widgits Pty Ltd,"
    "ST=Some-State,C=AU"
)


@pytest.fixture(scope="module")
def root() -> Identity:
    return load_identity_file(KEYS / "root@example.com.key", KEYS / "root@example.com.crt")


@pytest.fixture(scope="module")
def sender_cert() -> list[x509.Certificate]:
    return load_certs((KEYS / "sender@example.com.crt").read_bytes())


def _mail_id(name: str) -> str:
    return "ID:" + name.split("-", 1)[0]


def _text(msg: object) -> str:
    return msg.as_string()  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", SIGNED + ENCRYPTED + BOTH)
def test_corpus_opens_with_signer_known(
    name: str, root: Identity, sender_cert: list[x509.Certificate]
) -> None:
    result = unwrap((MAILS / name).read_bytes(), identities=[root], known_certs=sender_cert)
    assert _mail_id(name) in _text(result.message)
    assert result.message["Subject"] == f"Test Email {_mail_id(name)}"
    assert result.message["From"] == "sender <sender@example.com>"
    assert result.was_smime
    assert result.encryption == ("none" if name in SIGNED else "smime")
    if name in ENCRYPTED:
        assert (result.signature, result.signer) == ("none", None)
        assert result.protection_header() == "encryption=smime; signature=none"
    else:
        assert (result.signature, result.signer) == ("verified", SENDER_SUBJECT)
        assert result.signer_addresses == ("sender@example.com",)
        assert result.protection_header().endswith(f"signer={SENDER_SUBJECT}")
    assert not result.message.get_content_type().startswith("application/pkcs7")
    assert result.message.get_content_type() != "multipart/signed"


@pytest.mark.parametrize("name", SIGNED + BOTH)
def test_corpus_signer_unknown_without_the_partner_cert(name: str, root: Identity) -> None:
    result = unwrap((MAILS / name).read_bytes(), identities=[root], known_certs=[])
    assert (result.signature, result.signer) == ("unknown-key", SENDER_SUBJECT)
    assert _mail_id(name) in _text(result.message)


def test_corpus_signer_verified_through_its_ca(root: Identity) -> None:
    ca = load_certs((KEYS / "demoCA" / "cacert.pem").read_bytes())
    other = load_certs((KEYS / "otherCA" / "cacert.pem").read_bytes())
    raw = (MAILS / "7-signed-encrypted-plain.eml").read_bytes()
    assert unwrap(raw, identities=[root], known_certs=ca).signature == "verified"
    assert unwrap(raw, identities=[root], known_certs=other).signature == "unknown-key"


def test_corpus_signer_out_of_date_is_not_verified(
    root: Identity, sender_cert: list[x509.Certificate]
) -> None:
    raw = (MAILS / "1-signed.eml").read_bytes()
    later = dt.datetime(2124, 1, 1, tzinfo=dt.UTC)
    assert unwrap(raw, identities=[root], known_certs=sender_cert, now=later).signature == "unknown-key"


def test_corpus_binary_attachment_survives(root: Identity) -> None:
    result = unwrap((MAILS / "9-signed-encrypted-binary.eml").read_bytes(),
                    identities=[root], known_certs=[])
    png = next(p for p in result.message.iter_attachments() if p.get_filename() == "favicon.png")
    assert png.get_content()[:8] == b"\x89PNG\r\n\x1a\n"


def test_corpus_rollover_tries_every_hub_identity(root: Identity) -> None:
    newer = load_identity(*generate_smime_identity("root@example.com", "new root"))
    result = unwrap((MAILS / "4-encrypted-plain.eml").read_bytes(),
                    identities=[newer, root], known_certs=[])
    assert result.decrypted_with == root.fingerprint
    with pytest.raises(DecryptionFailed, match="not encrypted to any of the hub's"):
        unwrap((MAILS / "4-encrypted-plain.eml").read_bytes(), identities=[newer], known_certs=[])


def test_corpus_tampered_signed_mail_is_invalid(
    root: Identity, sender_cert: list[x509.Certificate]
) -> None:
    raw = (MAILS / "1-signed.eml").read_bytes().replace(b"ID:1", b"ID:7")
    result = unwrap(raw, identities=[root], known_certs=sender_cert)
    assert result.signature == "invalid"
    assert "digest" in result.reason


def test_worker_variant_takes_pems_and_returns_plain_data(root: Identity) -> None:
    key_pem = (KEYS / "root@example.com.key").read_bytes()
    cert_pem = (KEYS / "root@example.com.crt").read_bytes()
    sender_pem = (KEYS / "sender@example.com.crt").read_bytes()
    raw, facts = unwrap_pems((MAILS / "8-signed-encrypted-attachment.eml").read_bytes(),
                             [(key_pem, cert_pem)], [sender_pem])
    assert b"ID:8" in raw and b"\r\n" in raw
    assert facts["encryption"] == "smime" and facts["signature"] == "verified"
    assert facts["signer"] == SENDER_SUBJECT
