"""Outbound PGP/MIME checked by the gpg CLI on the recipient's side."""

from __future__ import annotations

import re
from collections.abc import Iterator
from email import policy
from pathlib import Path

import pytest

from mailhub.crypto.autocrypt import make_header, parse_header
from mailhub.crypto.openpgp import KeyUnusable
from mailhub.crypto.pgp_inbound import unwrap
from mailhub.crypto.pgpmime import (
    ENCRYPTED_SUBJECT,
    encrypt_bytes,
    encrypt_message,
    make_7bit_safe,
    sign_message,
)
from tests.crypto.pgp_fixtures import (
    Parties,
    gpg_cli,
    parse,
    parties,
    sample_message,
    validsig_primary,
)

REAL_SUBJECT = "[MT-2026-0042] Hüftprothese: pre-op plan"


@pytest.fixture(scope="module")
def pp() -> Iterator[Parties]:
    with parties() as p:
        yield p


@pytest.fixture(scope="module")
def encrypted(pp: Parties) -> bytes:
    ac = make_header("hub@medvoyage.example",
                     pp.hub.export_public_binary(pp.hub_key.fingerprint), True)
    out = encrypt_message(sample_message(REAL_SUBJECT), gnupghome=pp.hub.gnupghome,
                          recipients=[pp.partner_fpr, pp.hub_key.fingerprint],
                          signer=pp.hub_key.fingerprint, autocrypt_header=ac)
    return out.as_bytes(policy=policy.SMTP)


def test_outer_message_hides_the_subject_and_drops_bcc(encrypted: bytes) -> None:
    outer = parse(encrypted)
    assert outer["Subject"] == ENCRYPTED_SUBJECT == "..."
    head = encrypted.split(b"\r\n\r\n", 1)[0]
    for leak in (b"Hftprothese", b"pre-op", b"MT-2026-0042", b"H=C3=BCft", b"hidden-boss",
                 b"Thunderbird", b"labs.pdf", b"fasting"):
        assert leak not in encrypted.replace(b"\xc3\xbc", b""), leak
    assert b"Bcc" not in head
    assert outer["From"] == "Coordinator <coord@medvoyage.example>"
    assert outer["Cc"] == "second@clinic-a.example"
    assert outer["Message-ID"] == "<case-42.1@medvoyage.example>"
    assert outer["In-Reply-To"] == outer["References"] == "<case-42.0@clinic-a.example>"
    assert outer["Date"] and outer["MIME-Version"] == "1.0"
    assert outer.get_content_type() == "multipart/encrypted"
    assert outer.get_param("protocol") == "application/pgp-encrypted"
    control, body = outer.get_payload()
    assert control.get_content_type() == "application/pgp-encrypted"
    assert b"Version: 1" in control.get_payload(decode=True)
    assert body.get_content_type() == "application/octet-stream"
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))


def test_autocrypt_header_on_the_outer_message(pp: Parties, encrypted: bytes) -> None:
    header = parse_header(str(parse(encrypted)["Autocrypt"]))
    assert header is not None and header.addr == "hub@medvoyage.example"
    assert header.prefer_encrypt == "mutual"
    assert header.keydata == pp.hub.export_public_binary(pp.hub_key.fingerprint)


def test_gpg_decrypts_to_the_sent_message_signed_by_the_hub(pp: Parties,
                                                           encrypted: bytes) -> None:
    asc = parse(encrypted).get_payload()[1].get_payload(decode=True)
    proc = gpg_cli(pp.partner_home, "--decrypt", data=asc)
    assert validsig_primary(proc) == pp.hub_key.fingerprint
    inner = parse(proc.stdout)
    assert inner.get_param("protected-headers") == "v1"
    assert inner["Subject"] == REAL_SUBJECT
    assert inner["From"] == "Coordinator <coord@medvoyage.example>"
    assert inner["To"] == "Dr Clinic <doc@clinic-a.example>"
    assert inner["Message-ID"] == "<case-42.1@medvoyage.example>"
    assert inner["Bcc"] is None
    text, pdf = inner.get_payload()
    assert text.get_content().replace("\r\n", "\n") == (
        "Dear doctor,\nFrom the patient: fasting from 22:00 \nGrüße\n")
    assert pdf.get_filename() == "labs.pdf"
    assert pdf.get_payload(decode=True) == b"%PDF-1.4\x00\xff\xfe binary lab results"


def test_hub_reads_its_own_encrypted_message(pp: Parties, encrypted: bytes) -> None:
    u = unwrap(encrypted, gnupghome=pp.hub.gnupghome)
    assert (u.encryption, u.signature, u.signer) == ("openpgp", "verified",
                                                    pp.hub_key.fingerprint)
    assert u.message["Subject"] == REAL_SUBJECT


def test_encryption_to_an_unknown_key_raises(pp: Parties) -> None:
    with pytest.raises(KeyUnusable):
        encrypt_message(sample_message(), gnupghome=pp.hub.gnupghome, recipients=["B" * 40],
                        signer=pp.hub_key.fingerprint)


def _signed_part_and_signature(raw: bytes) -> tuple[bytes, bytes]:
    """Split multipart/signed by hand (not with the code under test)."""
    boundary = parse(raw).get_boundary().encode()
    body = raw.split(b"\r\n\r\n", 1)[1]
    preamble, first, sig_part, close = body.split(b"\r\n--" + boundary)
    assert close.startswith(b"--") and first.startswith(b"\r\n")
    first = first[2:]
    sig = sig_part.split(b"\r\n\r\n", 1)[1]
    return first, sig


def test_gpg_verifies_our_multipart_signed(pp: Parties, tmp_path: Path) -> None:
    signed = sign_message(sample_message(REAL_SUBJECT), gnupghome=pp.hub.gnupghome,
                          signer=pp.hub_key.fingerprint)
    raw = signed.as_bytes(policy=policy.SMTP)
    outer = parse(raw)
    assert outer.get_content_type() == "multipart/signed"
    assert outer.get_param("micalg") == "pgp-sha256"
    assert outer.get_param("protocol") == "application/pgp-signature"
    assert outer["Subject"] == REAL_SUBJECT and outer["Bcc"] is None
    content, sig = _signed_part_and_signature(raw)
    assert all(b < 128 for b in content), "the signed part must be 7bit"
    assert not re.search(rb"[ \t]\r\n", content), "no trailing whitespace to lose on the way"
    assert not re.search(rb"(?m)^From ", content)
    (tmp_path / "sig.asc").write_bytes(sig)
    proc = gpg_cli(pp.partner_home, "--verify", str(tmp_path / "sig.asc"), "-", data=content)
    assert validsig_primary(proc) == pp.hub_key.fingerprint
    u = unwrap(raw, gnupghome=pp.hub.gnupghome)
    assert (u.encryption, u.signature, u.signer) == ("none", "verified", pp.hub_key.fingerprint)
    text = u.message.get_payload()[0].get_content().replace("\r\n", "\n")
    assert text == "Dear doctor,\nFrom the patient: fasting from 22:00 \nGrüße\n"


def test_signature_survives_lf_serialisation_and_breaks_on_change(pp: Parties) -> None:
    signed = sign_message(sample_message(), gnupghome=pp.hub.gnupghome,
                          signer=pp.hub_key.fingerprint)
    lf = signed.as_bytes(policy=policy.default)
    assert b"\r\n" not in lf
    assert unwrap(lf, gnupghome=pp.hub.gnupghome).signature == "verified"
    assert unwrap(signed, gnupghome=pp.hub.gnupghome).signature == "verified"
    tampered = lf.replace(b"fasting from 22:00", b"fasting from 20:00")
    assert tampered != lf
    assert unwrap(tampered, gnupghome=pp.hub.gnupghome).signature == "invalid"


def test_make_7bit_safe_reencodes_only_what_needs_it() -> None:
    msg = sample_message()
    msg.add_attachment("plain ascii\n", filename="notes.txt")
    make_7bit_safe(msg)
    text, pdf, notes = msg.get_payload()
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    assert text.get_content() == "Dear doctor,\nFrom the patient: fasting from 22:00 \nGrüße\n"
    assert pdf["Content-Transfer-Encoding"] == "base64"
    assert notes["Content-Transfer-Encoding"] == "7bit"


def test_encrypt_bytes_keeps_the_body_bytes_and_folded_headers(pp: Parties) -> None:
    raw = ("From coord@medvoyage.example Mon Nov 23 10:00:00 2026\n"
           "From: =?utf-8?q?Koordinatorin_J=C3=BCrgens?= <coord@medvoyage.example>\n"
           "To: doc@clinic-a.example,\n second@clinic-a.example\n"
           "Subject: [MT-2026-0042] Rückflug\n"
           "Bcc: boss@medvoyage.example\n"
           "X-Case: MT-2026-0042\n"
           "\n"
           "No Content-Type here; body stays byte for byte.\n").encode()
    out = encrypt_bytes(raw, gnupghome=pp.hub.gnupghome, recipients=[pp.partner_fpr],
                        signer=pp.hub_key.fingerprint)
    head = out.split(b"\r\n\r\n", 1)[0]
    assert b"\n" not in head.replace(b"\r\n", b"")  # CRLF throughout the outer header
    assert b"Subject: ...\r\n" in head and b"R\xc3\xbcckflug" not in out
    # not in the clear anywhere: the armor is left out, where three letters occur by chance
    clear = out[: out.index(b"-----BEGIN PGP MESSAGE-----")] + out[out.index(b"-----END PGP"):]
    assert b"Bcc" not in clear and b"boss@medvoyage.example" not in out
    assert b"X-Case" not in head and b"From coord" not in head
    assert b"To: doc@clinic-a.example,\r\n second@clinic-a.example\r\n" in head
    outer = parse(out)
    proc = gpg_cli(pp.partner_home, "--decrypt",
                   data=outer.get_payload()[1].get_payload(decode=True))
    assert validsig_primary(proc) == pp.hub_key.fingerprint
    assert proc.stdout.endswith(b"\r\n\r\nNo Content-Type here; body stays byte for byte.\n")
    inner = parse(proc.stdout)
    assert inner.get_content_type() == "text/plain"
    assert inner.get_param("protected-headers") == "v1"
    assert inner["Subject"] == "[MT-2026-0042] Rückflug" and inner["X-Case"] == "MT-2026-0042"
    assert inner["Bcc"] is None


def test_encrypt_bytes_output_goes_after_data_unchanged(pp: Parties) -> None:
    # the sender trusts the body of what this writer makes (smtp_wire's clean_body): CRLF
    # line ends and no line starting with ".", whatever the submitted message looked like
    from mailhub.deliver.smtp_wire import data_payload, is_wire_clean

    raw = (b"From: coord@medvoyage.example\nTo: doc@clinic-a.example\nSubject: dots\n\n"
           b".leading dot\n..two\r\nbare CR\rend\n.\n" + b"x" * 3000 + b"\n")
    out = encrypt_bytes(raw, gnupghome=pp.hub.gnupghome, recipients=[pp.partner_fpr],
                        signer=pp.hub_key.fingerprint, autocrypt_header=make_header(
                            "coord@medvoyage.example", b"\x99" * 200, prefer_encrypt=True))
    assert is_wire_clean(out)
    assert data_payload(out, clean_body=True) == data_payload(out) == out + b".\r\n"
