"""The Mailhub-Protection header: its exact format, reading it back, stripping forged copies."""

from __future__ import annotations

from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

import pytest

from mailhub.crypto.protection import (
    HEADER,
    Protection,
    ProtectionHeaderError,
    format_protection,
    parse_protection,
    set_protection,
    strip_protection_headers,
)

FPR = "F0CB3B482CFA485680A4A0BDD328035D84881F1B"
SUBJECT_DN = "CN=Dr. Müller,O=Klinik Müller GmbH\\, Orthopädie,L=Berlin,C=DE"


def test_format_is_exactly_the_contract() -> None:
    assert format_protection("openpgp", "verified", FPR) == (
        f"encryption=openpgp; signature=verified; signer={FPR}")
    assert format_protection("none", "none", FPR) == "encryption=none; signature=none"
    assert format_protection("smime", "unknown-key", None) == (
        "encryption=smime; signature=unknown-key")
    assert format_protection("openpgp", "invalid", "") == "encryption=openpgp; signature=invalid"
    with pytest.raises(ValueError):
        format_protection("pgp", "verified", FPR)
    with pytest.raises(ValueError):
        format_protection("openpgp", "good", FPR)


@pytest.mark.parametrize("signer, pol", [
    ("CN=Dr. Smith,O=Klinik Berlin GmbH\\, Orthopaedics,L=Berlin,C=DE" + ",OU=a" * 4,
     policy.SMTP),
    # Non-ASCII subjects need an SMTPUTF8 writer: Python's RFC 2047 folding drops spaces.
    (SUBJECT_DN + ",emailAddress=a" * 3, policy.SMTPUTF8),
])
def test_parse_round_trips_through_a_folded_header(signer: str, pol: policy.Policy) -> None:
    msg = EmailMessage()
    msg[HEADER] = format_protection("smime", "verified", signer)
    msg.set_content("x")
    raw = msg.as_bytes(policy=pol)
    assert raw.count(b"\r\n ") >= 1  # it was folded
    again = BytesParser(policy=policy.default).parsebytes(raw)
    assert parse_protection(str(again[HEADER])) == Protection("smime", "verified", signer)


def test_parse_rules() -> None:
    assert parse_protection(f"encryption=openpgp; signature=verified; signer={FPR}").signer == FPR
    assert parse_protection("encryption=none; signature=none") == Protection("none", "none")
    for bad in ("", "encryption=aes; signature=none", "signature=verified", "garbage"):
        with pytest.raises(ProtectionHeaderError):
            parse_protection(bad)


def test_strip_removes_every_copy_in_every_part() -> None:
    msg = EmailMessage()
    msg["From"] = "a@b.example"
    msg["MAILHUB-PROTECTION"] = "encryption=openpgp; signature=verified"
    msg["mailhub-protection"] = "encryption=smime; signature=verified"
    msg.set_content("body")
    inner = EmailMessage()
    inner["Mailhub-Protection"] = "encryption=openpgp; signature=verified"
    inner.set_content("inner")
    msg.add_attachment(inner)
    msg.get_payload()[0]["Mailhub-Protection"] = "encryption=none; signature=none"
    assert strip_protection_headers(msg) == 4
    assert b"protection" not in msg.as_bytes().lower()
    assert msg["From"] == "a@b.example"
    set_protection(msg, "openpgp", "verified", FPR)
    assert msg.get_all(HEADER) == [f"encryption=openpgp; signature=verified; signer={FPR}"]
