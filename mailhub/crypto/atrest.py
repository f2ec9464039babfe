"""Encryption at rest: every stored object gets its own AES-256-GCM data key.

The data key is wrapped by a master key kept in keys/atrest.key. Older master keys stay as
keys/atrest-<id>.key after a rotation: the newest seals, any of them opens.

Blob format (all integers big-endian), version 2 (sealed now):
    magic b"MHAR" | version 2 (1 byte) | key id (8 bytes)
    | wrap nonce (12) | data key AES-256-GCM-encrypted under the master key + tag (48)
    | nonce (12 bytes) | ciphertext + GCM tag (16 bytes)
Version 1 (still opened) carried the data key under RFC 3394 AES key wrap (40 bytes) instead;
version 2 exists because key wrap costs ~50 us per call in Python, GCM ~2 us.
The header (everything before the ciphertext) and the caller's aad are authenticated.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

from mailhub.errors import CryptoError, MailhubError

log = logging.getLogger("mailhub.crypto")

MAGIC = b"MHAR"
VERSION = 2
KEY_SIZE = 32
_ID_LEN = 8
_WRAPPED_LEN = KEY_SIZE + 8
_NONCE_LEN = 12
_TAG_LEN = 16
HEADER_LEN = len(MAGIC) + 1 + _ID_LEN + _WRAPPED_LEN + _NONCE_LEN  # version 1
_GCM_WRAPPED_LEN = _NONCE_LEN + KEY_SIZE + _TAG_LEN
HEADER_LEN_V2 = len(MAGIC) + 1 + _ID_LEN + _GCM_WRAPPED_LEN + _NONCE_LEN
_OLD_KEYS_GLOB = "atrest-*.key"


def key_id(master: bytes) -> bytes:
    """A key's public name in blobs: not the key, and not usable to guess it."""
    return hashlib.sha256(b"mailhub at-rest key id\x00" + master).digest()[:_ID_LEN]


def generate_atrest_key(path: str | os.PathLike[str]) -> bytes:
    """Create a new master key file (32 random bytes, 0600); refuses to replace one."""
    master = secrets.token_bytes(KEY_SIZE)
    write_secret(path, master)
    return key_id(master)


def _read_key(path: Path) -> bytes:
    data = path.read_bytes()
    if len(data) != KEY_SIZE:
        text = data.strip()
        try:
            data = bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            data = b""
    if len(data) != KEY_SIZE:
        raise CryptoError(
            f"{path} is not an at-rest key (expected {KEY_SIZE} bytes)",
            hint="restore the file from backup; without it stored messages cannot be read",
        )
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("at-rest key %s is readable by others (mode %o); chmod 600 it", path, mode)
    return data


def rotate_atrest_key(path: str | os.PathLike[str]) -> bytes:
    """Keep the current master key as atrest-<id>.key and make a new one; returns its id."""
    current = Path(path)
    old = _read_key(current)
    kept = current.with_name(f"atrest-{key_id(old).hex()}.key")
    if not kept.exists():
        os.link(current, kept)
        fsync_dir(current.parent)
    master = secrets.token_bytes(KEY_SIZE)
    write_secret(current, master, overwrite=True)
    return key_id(master)


class AtRest:
    """Seals and opens stored objects with the hub's master at-rest keys."""

    def __init__(self, current: bytes, older: list[bytes] | None = None) -> None:
        if len(current) != KEY_SIZE:
            raise CryptoError("an at-rest master key must be 32 bytes")
        self._current_id = key_id(current)
        self._keys = {key_id(k): k for k in (older or []) if len(k) == KEY_SIZE}
        self._keys[self._current_id] = current
        self._ciphers: dict[bytes, AESGCM] = {}

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AtRest:
        """keys/atrest.key, plus every keys/atrest-*.key beside it (older, still opened)."""
        main = Path(path)
        if not main.exists():
            raise CryptoError(
                f"at-rest key {main} is missing",
                hint="run 'mailhub init' for a new instance, or restore keys/ from backup",
            )
        older = [_read_key(p) for p in sorted(main.parent.glob(_OLD_KEYS_GLOB))]
        return cls(_read_key(main), older)

    @property
    def key_id(self) -> str:
        """Hex id of the key that seals."""
        return self._current_id.hex()

    def _gcm(self, kid: bytes) -> AESGCM:
        cipher = self._ciphers.get(kid)
        if cipher is None:
            cipher = self._ciphers[kid] = AESGCM(self._keys[kid])
        return cipher

    def seal(self, plaintext: bytes, aad: bytes = b"") -> bytes:
        """Encrypt one object under a fresh data key; returns the versioned blob."""
        # the data key and both nonces from one getrandom call (a syscall: this runs per message)
        fresh = secrets.token_bytes(KEY_SIZE + 2 * _NONCE_LEN)
        data_key = fresh[:KEY_SIZE]
        wrap_nonce = fresh[KEY_SIZE:KEY_SIZE + _NONCE_LEN]
        nonce = fresh[KEY_SIZE + _NONCE_LEN:]
        prefix = MAGIC + bytes([VERSION]) + self._current_id
        wrapped = self._gcm(self._current_id).encrypt(wrap_nonce, data_key, prefix)
        header = prefix + wrap_nonce + wrapped + nonce
        return header + AESGCM(data_key).encrypt(nonce, plaintext, header + aad)

    def open(self, blob: bytes, aad: bytes = b"") -> bytes:
        """Decrypt a blob made by seal(); CryptoError when it was changed or the aad differs."""
        if len(blob) < HEADER_LEN + _TAG_LEN or blob[: len(MAGIC)] != MAGIC:
            raise CryptoError("not an at-rest encrypted object (bad header or truncated)")
        version = blob[len(MAGIC)]
        if version not in (1, 2):
            raise CryptoError(f"unsupported at-rest format version {version}")
        pos = len(MAGIC) + 1
        kid = blob[pos : pos + _ID_LEN]
        pos += _ID_LEN
        if kid not in self._keys:
            raise CryptoError(
                f"object sealed with at-rest key {kid.hex()}, which is not loaded",
                hint="restore the matching keys/atrest-*.key from backup",
            )
        try:
            if version == 1:
                wrapped = blob[pos : pos + _WRAPPED_LEN]
                nonce = blob[pos + _WRAPPED_LEN : HEADER_LEN]
                data_key = aes_key_unwrap(self._keys[kid], wrapped)
                header_len = HEADER_LEN
            else:
                if len(blob) < HEADER_LEN_V2 + _TAG_LEN:
                    raise CryptoError("not an at-rest encrypted object (truncated)")
                wrap_nonce = blob[pos : pos + _NONCE_LEN]
                wrapped = blob[pos + _NONCE_LEN : pos + _GCM_WRAPPED_LEN]
                nonce = blob[pos + _GCM_WRAPPED_LEN : HEADER_LEN_V2]
                data_key = self._gcm(kid).decrypt(wrap_nonce, wrapped, blob[: len(MAGIC) + 1 + _ID_LEN])
                header_len = HEADER_LEN_V2
            return AESGCM(data_key).decrypt(nonce, blob[header_len:], blob[:header_len] + aad)
        except (InvalidUnwrap, InvalidTag) as exc:
            raise CryptoError(
                "at-rest object failed its integrity check (changed, or wrong context)"
            ) from exc

    def seal_to_file(self, path: str | os.PathLike[str], data: bytes, aad: bytes = b"") -> None:
        """Seal and write atomically and durably: when this returns, it survives a crash."""
        write_durable(path, self.seal(data, aad))

    def open_file(self, path: str | os.PathLike[str], aad: bytes = b"") -> bytes:
        return self.open(Path(path).read_bytes(), aad)


def write_durable(path: str | os.PathLike[str], data: bytes) -> None:
    """tmp in the same directory, write, fsync, rename over, fsync the directory."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


# --- durable and secret files (keys, spool, sealed objects) --------------------------------


class SecretExists(MailhubError):
    """write_secret refused to replace an existing key file (keys are never silently lost)."""


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename or a new file in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_secret(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = False) -> None:
    """Write a key file atomically, mode 0600 from the moment it exists, durably.

    Without `overwrite` an existing file is never replaced (a lost key loses mail).
    """
    target = Path(path)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # umask may only remove bits; make it exactly 0600
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)  # atomic, and never replaces an existing file
            except FileExistsError as exc:
                raise SecretExists(
                    f"{target} already exists; not replacing a key file",
                    hint="move the old file away first if you really mean to replace it",
                ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(target.parent)
