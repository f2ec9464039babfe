"""Outbound S/MIME: what the hub sends, `openssl cms` decrypts and verifies; headers protected."""

from __future__ import annotations

import email.policy
import subprocess
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import pytest

from mailhub.crypto.certs import Identity, load_certs, load_identity
from mailhub.crypto.selfsigned import generate_smime_identity
from mailhub.crypto.smime import (
    sign_encrypt,
    sign_encrypt_bytes,
    sign_only,
    sign_only_bytes,
    to_crlf,
)
from mailhub.crypto.smime_inbound import unwrap
from mailhub.errors import CryptoError

PDF = bytes(range(256)) * 40


class Party:
    """A real key pair on disk, for openssl."""

    def __init__(self, directory: Path, address: str, name: str) -> None:
        self.key_pem, self.cert_pem = generate_smime_identity(address, name)
        self.identity: Identity = load_identity(self.key_pem, self.cert_pem)
        self.key = directory / f"{name}.key"
        self.cert = directory / f"{name}.crt"
        self.key.write_bytes(self.key_pem)
        self.cert.write_bytes(self.cert_pem)


@pytest.fixture(scope="module")
def parties(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Party]:
    d = tmp_path_factory.mktemp("smime-out")
    return {
        "hub": Party(d, "hub@medvoyage.example", "hub"),
        "clinic": Party(d, "doc@clinic-a.example", "clinic"),
        "lab": Party(d, "lab@clinic-b.example", "lab"),
    }


def _case_mail() -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Coordinator <coord@medvoyage.example>"
    msg["To"] = "doc@clinic-a.example"
    msg["Cc"] = "lab@clinic-b.example"
    msg["Bcc"] = "boss@medvoyage.example"
    msg["Subject"] = "[MT-2026-0042] Pre-op records for Ms Ünal"
    msg["Date"] = "Mon, 05 Jan 2026 10:00:00 +0000"
    msg["Message-ID"] = "<pre-op-1@medvoyage.example>"
    msg["In-Reply-To"] = "<q-1@clinic-a.example>"
    msg["References"] = "<q-1@clinic-a.example>"
    msg["X-Patient-Note"] = "allergic to penicillin"
    msg.set_content("Dear doctor,\nthe records are attached. Blood type 0+, café au lait.\n")
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="records.pdf")
    return msg


def _openssl(*args: str | Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["openssl", *map(str, args)], input=stdin, capture_output=True, check=False)


def _parse(raw: bytes) -> EmailMessage:
    return BytesParser(policy=email.policy.default).parsebytes(raw)  # type: ignore[return-value]


def test_openssl_decrypts_and_verifies_what_the_hub_sends(
    parties: dict[str, Party], tmp_path: Path
) -> None:
    hub, clinic, lab = parties["hub"], parties["clinic"], parties["lab"]
    out = sign_encrypt(
        _case_mail(), signer=hub.identity, recipients=[clinic.identity.cert, lab.identity.cert]
    )
    wire = tmp_path / "out.eml"
    wire.write_bytes(out.as_bytes())
    for party in (clinic, lab):  # every recipient can open it
        dec = _openssl("cms", "-decrypt", "-in", wire, "-inkey", party.key, "-recip", party.cert)
        assert dec.returncode == 0, dec.stderr
        signed = tmp_path / "signed.eml"
        signed.write_bytes(dec.stdout)
        ver = _openssl("cms", "-verify", "-in", signed, "-CAfile", hub.cert)
        assert ver.returncode == 0, ver.stderr
        assert b"Verification successful" in ver.stderr
        inner = _parse(ver.stdout)
        assert inner["Subject"] == "[MT-2026-0042] Pre-op records for Ms Ünal"
        assert inner["X-Patient-Note"] == "allergic to penicillin"
        assert "protected-headers" in inner["Content-Type"]
        assert "Bcc" not in inner
        body = inner.get_body(("plain",))
        assert body is not None and "café au lait" in body.get_content()
        pdf = next(p for p in inner.iter_attachments() if p.get_filename() == "records.pdf")
        assert pdf.get_content() == PDF


_BASE64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


def test_outer_headers_hide_the_subject_and_drop_bcc(parties: dict[str, Party]) -> None:
    out = sign_encrypt(
        _case_mail(), signer=parties["hub"].identity, recipients=[parties["clinic"].identity.cert]
    )
    assert out["Subject"] == "..."
    assert out.get_content_type() == "application/pkcs7-mime"
    assert out.get_param("smime-type") == "enveloped-data"
    for name in ("From", "To", "Cc", "Date", "Message-ID", "In-Reply-To", "References"):
        assert out[name] == _case_mail()[name]
    wire = out.as_bytes()
    assert b"Bcc:" not in wire and b"boss@" not in wire  # ":" and "@" are not base64
    assert b"penicillin" not in wire and b"Pre-op" not in wire
    lines = out.get_payload().splitlines()  # type: ignore[union-attr]
    assert max(len(line) for line in lines) <= 76  # RFC 2045's limit (the hub writes 64)
    assert not [line for line in lines if line.strip(_BASE64_ALPHABET)]


def test_openssl_rejects_the_signature_when_the_content_changes(
    parties: dict[str, Party], tmp_path: Path
) -> None:
    raw = sign_only_bytes(_case_mail().as_bytes(), parties["hub"].key_pem, parties["hub"].cert_pem)
    good = tmp_path / "good.eml"
    good.write_bytes(raw)
    assert _openssl("cms", "-verify", "-in", good, "-CAfile", parties["hub"].cert).returncode == 0
    bad = tmp_path / "bad.eml"
    bad.write_bytes(raw.replace(b"Dear doctor", b"Dear doktor"))
    assert b"Dear doktor" in bad.read_bytes()
    assert _openssl("cms", "-verify", "-in", bad, "-CAfile", parties["hub"].cert).returncode != 0


def test_sign_only_keeps_headers_readable_and_verifies(parties: dict[str, Party]) -> None:
    out = sign_only(_case_mail(), parties["hub"].identity)
    assert out.get_content_type() == "multipart/signed"
    assert out.get_param("micalg") == "sha-256"
    assert out["Subject"] == "[MT-2026-0042] Pre-op records for Ms Ünal"
    assert "Bcc" not in out
    result = unwrap(out, identities=[], known_certs=[parties["hub"].identity.cert])
    assert (result.encryption, result.signature) == ("none", "verified")
    assert result.signer == "CN=hub"


def test_roundtrip_through_the_hubs_own_inbound_path(parties: dict[str, Party]) -> None:
    hub, clinic = parties["hub"], parties["clinic"]
    raw = sign_encrypt_bytes(_case_mail().as_bytes(), hub.key_pem, hub.cert_pem, [clinic.cert_pem])
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    result = unwrap(raw, identities=[clinic.identity], known_certs=[hub.identity.cert])
    assert (result.encryption, result.signature, result.was_smime) == ("smime", "verified", True)
    assert result.signer_addresses == ("hub@medvoyage.example",)
    msg = result.message
    assert msg["Subject"] == "[MT-2026-0042] Pre-op records for Ms Ünal"
    assert msg["Message-ID"] == "<pre-op-1@medvoyage.example>"
    assert msg.get_content_type() == "multipart/mixed"
    body = msg.get_body(("plain",))
    assert body is not None and "Blood type 0+" in body.get_content()


def test_bytes_variant_accepts_pem_chains_and_plain_ascii(parties: dict[str, Party]) -> None:
    hub, clinic = parties["hub"], parties["clinic"]
    raw = b"From: a@medvoyage.example\nTo: doc@clinic-a.example\nSubject: hi\n\nplain ascii\n"
    out = sign_encrypt_bytes(raw, hub.key_pem, hub.cert_pem, [clinic.cert_pem])
    result = unwrap(out, identities=[clinic.identity], known_certs=load_certs(hub.cert_pem))
    assert result.message["Subject"] == "hi"
    assert result.message.get_content() == "plain ascii\n"
    assert result.signature == "verified"


def test_no_recipient_is_an_error_not_plaintext(parties: dict[str, Party]) -> None:
    with pytest.raises(CryptoError, match="no S/MIME recipient"):
        sign_encrypt(_case_mail(), signer=parties["hub"].identity, recipients=[])


def test_signed_bytes_survive_relays_8bit_long_lines_trailing_space(
    parties: dict[str, Party], tmp_path: Path
) -> None:
    hub = parties["hub"]
    body = "Grüße  \nline with trailing space \n" + "x" * 2000 + "\nend\tTab\t\n"
    raw = (
        "From: a@medvoyage.example\nTo: c@clinic-a.example\nSubject: s\nMIME-Version: 1.0\n"
        "Content-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n" + body
    ).encode()
    out = sign_only_bytes(raw, hub.key_pem, hub.cert_pem)
    assert out.isascii()
    assert max(len(line) for line in out.split(b"\r\n")) <= 998
    wire = tmp_path / "long.eml"
    wire.write_bytes(out)
    assert _openssl("cms", "-verify", "-in", wire, "-CAfile", hub.cert).returncode == 0
    result = unwrap(out, identities=[], known_certs=[hub.identity.cert])
    assert result.signature == "verified"
    assert result.message.get_content() == body


@pytest.mark.parametrize(("raw", "canonical"), [
    (b"a\r\nb\r\n", b"a\r\nb\r\n"),  # from SMTP: already canonical
    (b"a\nb\n", b"a\r\nb\r\n"),
    (b"a\r\nb\nc", b"a\r\nb\r\nc"),  # mixed
    (b"a\rb\r\n", b"a\rb\r\n"),  # a bare CR is content, left alone
    (b"a\r\n\nb", b"a\r\n\r\nb"),  # as many LF as CRLF would fool a count of CR alone
    (b"", b""),
])
def test_to_crlf_canonical_line_ends(raw: bytes, canonical: bytes) -> None:
    assert to_crlf(raw) == canonical
    assert to_crlf(canonical) == canonical


def test_sign_encrypt_bytes_output_goes_after_data_unchanged(parties: dict[str, Party]) -> None:
    # the sender trusts the body of what this writer makes (smtp_wire's clean_body)
    from mailhub.deliver.smtp_wire import data_payload, is_wire_clean

    hub, clinic = parties["hub"], parties["clinic"]
    raw = (b"From: a@medvoyage.example\nTo: doc@clinic-a.example\nSubject: dots\n\n"
           b".leading dot\n..two\r\nbare CR\rend\n.\n" + "Grüße ".encode() * 500 + b"\n")
    out = sign_encrypt_bytes(raw, hub.key_pem, hub.cert_pem, [clinic.cert_pem])
    assert is_wire_clean(out)
    assert data_payload(out, clean_body=True) == data_payload(out) == out + b".\r\n"
