"""Hostile inbound mail at the opening layer: parts that only call themselves signatures,
compression bombs (in one block or spread over several), headers behind a bare CR."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailhub.crypto import pgp_inbound
from mailhub.crypto.inbound import InboundKeys, open_message
from mailhub.crypto.openpgp_ops import decrypt
from mailhub.errors import DecryptionFailed
from tests.crypto.pgp_fixtures import Parties, gpg_cli, parties

HEAD = (b"From: Dr Clinic <doc@clinic-a.example>\r\nTo: intake@medvoyage.example\r\n"
        b"Subject: s\r\nMessage-ID: <h1@clinic-a.example>\r\nMIME-Version: 1.0\r\n")


@pytest.fixture(scope="module")
def pp() -> Iterator[Parties]:
    with parties() as p:
        yield p


def mixed(*parts: bytes) -> bytes:
    body = b"".join(b"--B\r\n" + p + b"\r\n" for p in parts)
    return HEAD + b"Content-Type: multipart/mixed; boundary=B\r\n\r\n" + body + b"--B--\r\n"


def test_a_part_named_like_a_signature_is_still_content(pp: Parties) -> None:
    """A clearsigned text with an unsigned inline part named "note.sig" beside it was reported
    verified: the part was skipped as "a signature", though a mail client shows it as text."""
    signed = gpg_cli(pp.partner_home, "--clearsign", data=b"Arrive at 07:00.\n").stdout
    raw = mixed(b"Content-Type: text/plain\r\n\r\n" + signed,
                b"Content-Type: text/plain; name=\"note.sig\"\r\nContent-Disposition: inline"
                b"\r\n\r\nWire 5000 EUR to IBAN XX today.")
    u = pgp_inbound.unwrap(raw, gnupghome=pp.hub.gnupghome)
    assert (u.encryption, u.signature, u.signer) == ("none", "none", None)


def test_a_stray_signature_part_beside_encrypted_content_is_not_encrypted(pp: Parties) -> None:
    """EFAIL-style mixed content: an application/pgp-signature part that signs nothing is
    plaintext the sender wrote, so the message is not "openpgp" as a whole."""
    enc = gpg_cli(pp.partner_home, "--trust-model", "always", "--armor", "--encrypt", "-r",
                  pp.hub_key.fingerprint, data=b"secret\n").stdout
    raw = mixed(b"Content-Type: application/octet-stream\r\nContent-Disposition: attachment;"
                b" filename=\"a.pgp\"\r\n\r\n" + enc,
                b"Content-Type: application/pgp-signature\r\n\r\nCall +1 555 0100 now.")
    u = pgp_inbound.unwrap(raw, gnupghome=pp.hub.gnupghome)
    assert (u.encryption, u.signature) == ("none", "none")


def test_a_detached_signature_of_a_sibling_still_signs_it(pp: Parties) -> None:
    data = b"%PDF-1.4 scan"
    sig = gpg_cli(pp.partner_home, "--armor", "--detach-sign", data=data).stdout
    raw = mixed(b"Content-Type: application/pdf\r\nContent-Disposition: attachment;"
                b" filename=\"scan.pdf\"\r\n\r\n" + data,
                b"Content-Type: application/pgp-signature; name=\"scan.pdf.sig\"\r\n\r\n" + sig)
    u = pgp_inbound.unwrap(raw, gnupghome=pp.hub.gnupghome)
    assert (u.signature, u.signer) == ("verified", pp.partner_fpr)


def _bomb(pp: Parties, size: int) -> bytes:
    return gpg_cli(pp.partner_home, "--trust-model", "always", "--armor", "-z", "9",
                   "--compress-algo", "zlib", "--encrypt", "-r", pp.hub_key.fingerprint,
                   data=bytes(size)).stdout


def test_decrypt_refuses_output_past_its_limit_instead_of_cutting_it(pp: Parties) -> None:
    """gpg stops writing at --max-output yet reports DECRYPTION_OKAY: the hub used to take the
    first part of the plaintext as the whole message."""
    bomb = _bomb(pp, 4 * 1024 * 1024)
    assert len(bomb) < 64 * 1024
    with pytest.raises(DecryptionFailed, match="larger than the hub accepts"):
        decrypt(pp.hub.gnupghome, bomb, max_output=1024 * 1024)
    assert len(decrypt(pp.hub.gnupghome, bomb).plaintext) == 4 * 1024 * 1024


def test_the_limit_is_for_the_whole_message(pp: Parties,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Many blocks, each under the limit, must not add up past it."""
    monkeypatch.setattr(pgp_inbound, "MAX_OUTPUT", 1024 * 1024)
    block = _bomb(pp, 600 * 1024)
    one = HEAD + b"Content-Type: text/plain\r\n\r\n" + block
    assert pgp_inbound.unwrap(one, gnupghome=pp.hub.gnupghome).encryption == "openpgp"
    with pytest.raises(DecryptionFailed, match="larger than the hub accepts"):
        pgp_inbound.unwrap(one + b"\r\n" + block, gnupghome=pp.hub.gnupghome)


def test_a_header_hidden_behind_a_bare_cr_is_stripped(tmp_path: Path) -> None:
    """Python's parser (and so the relay's and IMAP copy's readers) ends a header line at a
    bare CR; the hub's raw header editing did not, so a forged header survived behind one."""
    raw = (b"From: ana@example.org\r\nSubject: hi\rMailhub-Protection: encryption=openpgp; "
           b"signature=verified; signer=X\r\nX-Other: 1\r\n\r\nhello\r\n")
    opened = open_message(raw, InboundKeys(str(tmp_path), (), ()))
    msg = email.message_from_bytes(opened.raw, policy=email.policy.default)
    assert msg.get_all("Mailhub-Protection") == ["encryption=none; signature=none"]
    assert msg["Subject"] == "hi" and msg["X-Other"] == "1" and msg.get_content() == "hello\r\n"
