"""Tying a good signature to the sender: S/MIME signer certificates and the From addresses.

(OpenPGP keys are tied through the hub's key records; tests/ingress/test_inbound_hostile.py
sends such mail over SMTP.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

from mailhub.crypto.inbound import InboundKeys, open_message
from mailhub.crypto.selfsigned import generate_smime_identity
from mailhub.crypto.signer_binding import from_addresses, signer_matches_sender


def _smime_signed(tmp: Path, signer: tuple[bytes, bytes], sender: str) -> bytes:
    (tmp / "s.key").write_bytes(signer[0])
    (tmp / "s.crt").write_bytes(signer[1])
    (tmp / "in.txt").write_bytes(b"Content-Type: text/plain\r\n\r\nNew bank details.\r\n")
    done = subprocess.run(["openssl", "cms", "-sign", "-in", str(tmp / "in.txt"), "-signer",
                           str(tmp / "s.crt"), "-inkey", str(tmp / "s.key"), "-from", sender,
                           "-to", "intake@medvoyage.example", "-subject", "x"],
                          capture_output=True, check=True)
    return done.stdout


def test_smime_signer_must_name_the_from_address(tmp_path: Path) -> None:
    """A known partner's certificate (for doc@clinic-a) signing mail "From" another address
    verifies cryptographically, but it is not that sender's signature."""
    clinic = generate_smime_identity("doc@clinic-a.example", "Dr A")
    keys = InboundKeys(str(tmp_path), (), (clinic[1],))
    own = open_message(_smime_signed(tmp_path, clinic, "doc@clinic-a.example"), keys)
    other = open_message(_smime_signed(tmp_path, clinic, "boss@clinic-b.example"), keys)
    assert own.signature == other.signature == "verified"  # the CMS check alone
    assert signer_matches_sender(None, own)  # type: ignore[arg-type]  # no query for S/MIME
    assert not signer_matches_sender(None, other)  # type: ignore[arg-type]
    bound = other.with_signature("unknown-key")
    assert bound.raw.count(b"Mailhub-Protection") == 1
    assert b"Mailhub-Protection: encryption=none; signature=unknown-key; signer=" in bound.raw


def test_from_addresses_reads_every_from_field() -> None:
    raw = (b"From: A <a@x.example>, b@Y.example\r\nFrom: c@z.example\r\n"
           b"Subject: s\r\n\r\nFrom: body@not.example\r\n")
    assert from_addresses(raw) == ["a@x.example", "b@y.example", "c@z.example"]

