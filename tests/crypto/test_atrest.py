"""Encryption at rest: per-object data keys, tamper detection, rotation, durable 0600 files."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from mailhub.crypto.atrest import (
    HEADER_LEN,
    AtRest,
    SecretExists,
    generate_atrest_key,
    rotate_atrest_key,
)
from mailhub.errors import CryptoError


@pytest.fixture
def keyfile(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "atrest.key"
    generate_atrest_key(path)
    return path


def test_key_file_is_32_random_bytes_0600_and_never_replaced(keyfile: Path) -> None:
    assert len(keyfile.read_bytes()) == 32
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    before = keyfile.read_bytes()
    with pytest.raises(SecretExists):
        generate_atrest_key(keyfile)
    assert keyfile.read_bytes() == before


def test_roundtrip_and_fresh_data_key_per_object(keyfile: Path) -> None:
    box = AtRest.load(keyfile)
    a = box.seal(b"patient record", b"msg-1")
    b = box.seal(b"patient record", b"msg-1")
    assert box.open(a, b"msg-1") == box.open(b, b"msg-1") == b"patient record"
    assert b"patient record" not in a
    assert a[:4] == b"MHAR" and a[4] == 2 and a[5:13] == bytes.fromhex(box.key_id)
    assert a[13:HEADER_LEN] != b[13:HEADER_LEN]  # wrapped key and nonce differ per object
    assert box.open(box.seal(b""), b"") == b""


def test_any_changed_byte_is_detected(keyfile: Path) -> None:
    box = AtRest.load(keyfile)
    blob = box.seal(b"x" * 100, b"ctx")
    for pos in range(4, len(blob), 7):  # header fields, nonce, ciphertext and tag
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        with pytest.raises(CryptoError):
            box.open(bytes(bad), b"ctx")
    with pytest.raises(CryptoError):
        box.open(blob[:-1], b"ctx")
    with pytest.raises(CryptoError):
        box.open(b"PLAIN" + blob, b"ctx")


def test_wrong_aad_and_wrong_key_are_refused(keyfile: Path, tmp_path: Path) -> None:
    box = AtRest.load(keyfile)
    blob = box.seal(b"data", b"spool-1")
    with pytest.raises(CryptoError, match="integrity"):
        box.open(blob, b"spool-2")
    other_path = tmp_path / "other" / "atrest.key"
    generate_atrest_key(other_path)
    with pytest.raises(CryptoError, match="not loaded"):
        AtRest.load(other_path).open(blob, b"spool-1")
    with pytest.raises(CryptoError, match="missing"):
        AtRest.load(tmp_path / "nowhere" / "atrest.key")


def test_rotation_newest_seals_older_still_open(keyfile: Path) -> None:
    old_box = AtRest.load(keyfile)
    old_blob = old_box.seal(b"before rotation")
    new_id = rotate_atrest_key(keyfile)
    kept = keyfile.parent / f"atrest-{old_box.key_id}.key"
    assert kept.exists() and stat.S_IMODE(kept.stat().st_mode) == 0o600
    box = AtRest.load(keyfile)
    assert box.key_id == new_id.hex() != old_box.key_id
    assert box.open(old_blob) == b"before rotation"
    new_blob = box.seal(b"after")
    assert new_blob[5:13] == new_id
    with pytest.raises(CryptoError):
        old_box.open(new_blob)


def test_seal_to_file_is_atomic_0600_and_readable_back(keyfile: Path, tmp_path: Path) -> None:
    box = AtRest.load(keyfile)
    spool = tmp_path / "spool"
    spool.mkdir()
    target = spool / "m1.msg"
    box.seal_to_file(target, b"first", b"m1")
    box.seal_to_file(target, b"second", b"m1")
    assert box.open_file(target, b"m1") == b"second"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in spool.iterdir()] == ["m1.msg"]


def test_version_1_blobs_still_open(keyfile: Path) -> None:
    """Objects sealed before the GCM key wrap (RFC 3394 key wrap, version 1) stay readable."""
    import secrets

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.keywrap import aes_key_wrap

    box = AtRest.load(keyfile)
    master = keyfile.read_bytes()
    data_key, nonce = AESGCM.generate_key(bit_length=256), secrets.token_bytes(12)
    header = b"MHAR\x01" + bytes.fromhex(box.key_id) + aes_key_wrap(master, data_key) + nonce
    blob = header + AESGCM(data_key).encrypt(nonce, b"old record", header + b"ctx")
    assert box.open(blob, b"ctx") == b"old record"
    with pytest.raises(CryptoError):
        box.open(blob[:-1] + bytes([blob[-1] ^ 1]), b"ctx")
