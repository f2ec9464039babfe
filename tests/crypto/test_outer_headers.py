"""What stays readable outside protected mail: routing and threading only, the same for both
methods. Everything else (Reply-To's display name, trace fields, X-Patient-*, Comments, ...)
travels only inside the ciphertext, checked by decrypting with the `gpg` and `openssl cms` CLIs;
trace fields from the submission hop, which may name Bcc recipients, go nowhere."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailhub.crypto.pgpmime import encrypt_bytes
from mailhub.crypto.selfsigned import generate_smime_identity
from mailhub.crypto.smime import sign_encrypt_bytes
from tests.crypto.pgp_fixtures import Parties, gpg_cli, parse, parties

SECRET = "Maria Garcia HIV clinic"
# Headers the wire may show outside the ciphertext (names, lower case).
ALLOWED_OUTSIDE = {"from", "sender", "to", "cc", "date", "message-id", "in-reply-to",
                   "references", "auto-submitted", "subject", "mime-version", "autocrypt",
                   "content-type", "content-transfer-encoding", "content-disposition",
                   "content-description"}
INSIDE_ONLY = ("Reply-To", "X-Patient-Name", "Comments", "Keywords",
               "Disposition-Notification-To", "Thread-Topic", "Organization")
RAW = "\r\n".join([
    "From: Coordinator <coord@medvoyage.example>",
    "To: Dr Clinic <doc@clinic-a.example>",
    "Cc: second@clinic-a.example",
    f"Reply-To: {SECRET} <coord@medvoyage.example>",
    f"Subject: [MT-2026-0042] {SECRET}",
    "Date: Mon, 23 Nov 2026 10:00:00 +0000",
    "Message-ID: <case-42.1@medvoyage.example>",
    "In-Reply-To: <case-42.0@clinic-a.example>",
    "References: <case-42.0@clinic-a.example>",
    f"X-Patient-Name: {SECRET}",
    f"Comments: {SECRET}",
    f"Keywords: {SECRET}",
    f"Disposition-Notification-To: {SECRET} <coord@medvoyage.example>",
    f"Thread-Topic: {SECRET}",
    f"Organization: {SECRET}",
    "Received: from laptop.medvoyage.example ([10.1.2.3]) by mx.medvoyage.example",
    " for <hidden-boss@medvoyage.example>; Mon, 23 Nov 2026 10:00:00 +0000",
    "Return-Path: <hidden-boss@medvoyage.example>",
    "Content-Type: text/plain; charset=us-ascii",
    f"Content-Description: {SECRET}",
    "",
    f"body: {SECRET}",
    "",
]).encode()


@pytest.fixture(scope="module")
def pp() -> Iterator[Parties]:
    with parties() as p:
        yield p


def _outer_names(wire: bytes) -> list[str]:
    return [name.lower() for name in parse(wire).keys()]


def _check_outside(wire: bytes) -> None:
    head = wire.split(b"\r\n\r\n", 1)[0]
    assert not set(_outer_names(wire)) - ALLOWED_OUTSIDE, head.decode()
    assert b"Maria" not in wire and b"hidden-boss" not in wire and b"10.1.2.3" not in wire
    assert parse(wire)["Reply-To"] is None


def _check_inside(inner: bytes) -> None:
    msg = parse(inner)
    for name in INSIDE_ONLY:
        assert SECRET in str(msg[name]), name
    assert msg["Subject"] == f"[MT-2026-0042] {SECRET}"
    # the submission hop's trace named a Bcc recipient: visible recipients must not learn it
    assert b"hidden-boss" not in inner and msg["Received"] is None


def test_pgpmime_outside_only_routing_inside_everything(pp: Parties) -> None:
    wire = encrypt_bytes(RAW, gnupghome=pp.hub.gnupghome, recipients=[pp.partner_fpr],
                         signer=pp.hub_key.fingerprint)
    _check_outside(wire)
    asc = parse(wire).get_payload()[1].get_payload(decode=True)
    _check_inside(gpg_cli(pp.partner_home, "--decrypt", data=asc).stdout)


def test_smime_outside_only_routing_inside_everything(tmp_path: Path) -> None:
    key_pem, cert_pem = generate_smime_identity("doc@clinic-a.example", "clinic")
    hub_key, hub_cert = generate_smime_identity("hub@medvoyage.example", "hub")
    (tmp_path / "k.pem").write_bytes(key_pem)
    (tmp_path / "c.pem").write_bytes(cert_pem)
    wire = sign_encrypt_bytes(RAW, hub_key, hub_cert, [cert_pem])
    _check_outside(wire)
    dec = subprocess.run(["openssl", "cms", "-decrypt", "-inkey", str(tmp_path / "k.pem"),
                          "-recip", str(tmp_path / "c.pem")], input=wire, capture_output=True,
                         check=True)
    signed = parse(dec.stdout)
    assert signed.get_content_type() == "multipart/signed"
    _check_inside(signed.get_payload()[0].as_bytes())
