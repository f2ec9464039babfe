"""The per-message operations against the real gpg CLI on the other side."""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailhub.crypto.openpgp import (
    KeyUnusable,
    decrypt,
    detached_signature,
    sign_detached,
    sign_encrypt,
    verify_detached,
)
from mailhub.crypto.openpgp_ops import parse_signatures, summarize_signatures
from mailhub.errors import CryptoError, DecryptionFailed
from tests.crypto.pgp_fixtures import (
    Parties,
    cli_make_key,
    gpg_cli,
    parties,
    throwaway_home,
    validsig_primary,
)

TEXT = "Patient record: allergy to penicillin. Grüße\n".encode()


@pytest.fixture(scope="module")
def pp() -> Iterator[Parties]:
    with parties() as p:
        yield p


@pytest.fixture(scope="module")
def stranger() -> Iterator[tuple[str, str]]:
    """A third party the hub has never heard of (gpg CLI home, primary fingerprint)."""
    with throwaway_home() as h:
        fpr, _ = cli_make_key(h, "Stranger <who@elsewhere.example>")
        yield h, fpr


def test_what_we_encrypt_gpg_decrypts_with_our_good_signature(pp: Parties) -> None:
    armored = sign_encrypt(pp.hub.gnupghome, TEXT, [pp.partner_fpr], pp.hub_key.fingerprint)
    assert armored.startswith(b"-----BEGIN PGP MESSAGE-----")
    assert TEXT not in armored
    proc = gpg_cli(pp.partner_home, "--decrypt", data=armored)
    assert proc.stdout == TEXT
    assert validsig_primary(proc) == pp.hub_key.fingerprint
    assert b"GOODSIG" in proc.stderr


def test_what_gpg_signs_and_encrypts_we_decrypt_and_verify(pp: Parties) -> None:
    ct = gpg_cli(pp.partner_home, "--trust-model", "always", "--armor", "--sign", "--encrypt",
                 "--recipient", pp.hub_key.fingerprint, data=TEXT).stdout
    out = decrypt(pp.hub.gnupghome, ct)
    assert out.plaintext == TEXT and out.encrypted
    assert out.signature == "verified"
    # The signing subkey made the signature; the PRIMARY fingerprint is reported.
    assert out.signer == pp.partner_fpr and out.signer != pp.partner_sign_subkey


def test_signature_by_unknown_key(pp: Parties, stranger: tuple[str, str]) -> None:
    home, fpr = stranger
    gpg_cli(home, "--import", data=pp.hub.export_public(pp.hub_key.fingerprint).encode())
    ct = gpg_cli(home, "--trust-model", "always", "--sign", "--encrypt", "--recipient",
                 pp.hub_key.fingerprint, data=TEXT).stdout
    out = decrypt(pp.hub.gnupghome, ct)
    assert out.plaintext == TEXT
    assert out.signature == "unknown-key" and out.signer is None and out.issuer


def test_wrong_recipient_is_refused(pp: Parties, stranger: tuple[str, str]) -> None:
    home, fpr = stranger
    ct = gpg_cli(home, "--armor", "--encrypt", "--recipient", fpr, data=TEXT).stdout
    with pytest.raises(DecryptionFailed, match="not encrypted to any of the hub's keys"):
        decrypt(pp.hub.gnupghome, ct)


def test_tampered_ciphertext_is_refused(pp: Parties) -> None:
    ct = gpg_cli(pp.partner_home, "--trust-model", "always", "--sign", "--encrypt",
                 "--recipient", pp.hub_key.fingerprint, data=TEXT * 20).stdout
    for pos in (len(ct) // 2, len(ct) - 30):
        bad = bytearray(ct)
        bad[pos] ^= 0x55
        with pytest.raises(DecryptionFailed):
            decrypt(pp.hub.gnupghome, bytes(bad))


def test_truncated_and_garbage_input(pp: Parties) -> None:
    ct = sign_encrypt(pp.hub.gnupghome, TEXT, [pp.hub_key.fingerprint], pp.hub_key.fingerprint)
    with pytest.raises(DecryptionFailed):
        decrypt(pp.hub.gnupghome, ct[: len(ct) // 2])
    with pytest.raises(DecryptionFailed):
        decrypt(pp.hub.gnupghome, b"-----BEGIN PGP MESSAGE-----\n\nnot base64 at all\n")
    with pytest.raises(DecryptionFailed, match="empty"):
        decrypt(pp.hub.gnupghome, b"  \n")


def test_tampered_signed_text_is_invalid(pp: Parties) -> None:
    signed = gpg_cli(pp.partner_home, "--clearsign", data=b"Take 2 tablets daily.\n").stdout
    good = decrypt(pp.hub.gnupghome, signed)
    assert (good.signature, good.signer, good.encrypted) == ("verified", pp.partner_fpr, False)
    bad = decrypt(pp.hub.gnupghome, signed.replace(b"Take 2", b"Take 9"))
    assert bad.signature == "invalid" and bad.signer == pp.partner_fpr


def test_detached_signatures_both_ways(pp: Parties) -> None:
    sig = detached_signature(pp.hub.gnupghome, TEXT, pp.hub_key.fingerprint)
    assert sig.micalg == "pgp-sha256" and sig.armored.startswith(b"-----BEGIN PGP SIGNATURE")
    assert sign_detached(pp.hub.gnupghome, TEXT, pp.hub_key.fingerprint).startswith(b"-----")
    assert verify_detached(pp.hub.gnupghome, TEXT, sig.armored) == ("verified",
                                                                   pp.hub_key.fingerprint)
    assert verify_detached(pp.hub.gnupghome, TEXT + b"x", sig.armored)[0] == "invalid"
    assert verify_detached(pp.hub.gnupghome, TEXT, b"garbage")[0] == "invalid"
    sig_path = Path(pp.partner_home) / "sig.asc"
    sig_path.write_bytes(sig.armored)
    proc = gpg_cli(pp.partner_home, "--verify", str(sig_path), "-", data=TEXT)
    assert validsig_primary(proc) == pp.hub_key.fingerprint
    theirs = gpg_cli(pp.partner_home, "--armor", "--detach-sign", data=TEXT).stdout
    assert verify_detached(pp.hub.gnupghome, TEXT, theirs) == ("verified", pp.partner_fpr)


def test_revoked_signer_is_not_verified(pp: Parties) -> None:
    with throwaway_home() as home:
        fpr, _ = cli_make_key(home, "Soon Revoked <rev@clinic-a.example>")
        pub = gpg_cli(home, "--armor", "--export", fpr).stdout
        gpg_cli(pp.hub.gnupghome, "--import", data=pub)
        signed = gpg_cli(home, "--sign", data=TEXT).stdout
        assert decrypt(pp.hub.gnupghome, signed).signature == "verified"
        cert = (Path(home) / "openpgp-revocs.d" / f"{fpr}.rev").read_text()
        gpg_cli(pp.hub.gnupghome, "--import", data=re.sub(r"(?m)^:", "", cert).encode())
        out = decrypt(pp.hub.gnupghome, signed)
        assert out.signature == "invalid" and out.signer == fpr
        with pytest.raises(KeyUnusable, match="unusable public key") as err:
            sign_encrypt(pp.hub.gnupghome, TEXT, [fpr], pp.hub_key.fingerprint)
        assert err.value.fingerprint == fpr and err.value.role == "recipient"
        gpg_cli(pp.hub.gnupghome, "--delete-keys", "--yes", fpr)


def test_encrypt_refuses_vague_or_missing_recipients(pp: Parties) -> None:
    with pytest.raises(CryptoError, match="fingerprint"):
        sign_encrypt(pp.hub.gnupghome, TEXT, ["doc@clinic-a.example"], pp.hub_key.fingerprint)
    with pytest.raises(CryptoError, match="no recipient"):
        sign_encrypt(pp.hub.gnupghome, TEXT, [], pp.hub_key.fingerprint)
    with pytest.raises(KeyUnusable, match="no such key"):
        sign_encrypt(pp.hub.gnupghome, TEXT, ["A" * 40], pp.hub_key.fingerprint)
    with pytest.raises(CryptoError):  # the partner's key has no secret part here
        sign_encrypt(pp.hub.gnupghome, TEXT, [pp.partner_fpr], pp.partner_fpr)


def test_operations_are_picklable_for_worker_processes() -> None:
    for fn in (sign_encrypt, decrypt, verify_detached, sign_detached):
        assert pickle.loads(pickle.dumps(fn)) is fn


def test_signature_status_parsing_is_pure() -> None:
    lines = [s.split(" ") for s in (
        "NEWSIG", "KEY_CONSIDERED AAAA 0", "GOODSIG 1111 Dr X <x@y>",
        "VALIDSIG SUBKEYFPR 2026-01-01 1 0 4 0 22 10 00 PRIMARYFPR",
        "NEWSIG", "ERRSIG 2222 22 10 00 1 9 FULLFPR2222", "NO_PUBKEY 2222",
        "NEWSIG", "KEY_CONSIDERED BBBB 0", "BADSIG 3333 Mallory",
    )]
    sigs = parse_signatures(lines)
    assert [(s.status, s.signer) for s in sigs] == [
        ("verified", "PRIMARYFPR"), ("unknown-key", None), ("invalid", "BBBB")]
    assert sigs[1].issuer == "FULLFPR2222"
    assert summarize_signatures(sigs).status == "invalid"
    assert summarize_signatures(sigs[:2]).status == "unknown-key"
    assert summarize_signatures(sigs[:1]) == ("verified", "PRIMARYFPR", "1111")
    assert summarize_signatures([]).status == "none"
