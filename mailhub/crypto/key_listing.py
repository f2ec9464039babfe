"""Reading gpg's colon listings into ``KeyInfo``: who a key names, what it can do, until when.

Kept apart from the keyring so that what "usable" means can be read (and tested) on its own:
an encryption subkey that expires before its primary, or one too short to trust, decides
whether mail to that key may be sent at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parseaddr

_ALGOS = {"1": "rsa", "2": "rsa", "3": "rsa", "16": "elg", "17": "dsa", "18": "ecdh",
          "19": "ecdsa", "22": "eddsa"}


@dataclass(frozen=True)
class KeyInfo:
    """One OpenPGP key as gpg lists it (primary fingerprint, valid user IDs, capabilities)."""

    fingerprint: str
    addresses: tuple[str, ...]
    uids: tuple[str, ...]
    created: datetime
    expires: datetime | None
    revoked: bool
    expired: bool
    can_encrypt: bool
    can_sign: bool
    secret: bool
    algo: str
    # When the last valid encryption (sub)key stops being usable, capped by the primary's
    # expiry (None: never). An encryption subkey often expires long before its primary, and
    # the policy must stop choosing the key then, not when gpg starts failing.
    encrypt_expires: datetime | None = None
    weak_encryption: str = ""  # e.g. "rsa1024" when a valid encryption key is too short

    @property
    def usable_for_encryption(self) -> bool:
        """gpg's capital E: some valid (unexpired, unrevoked) key or subkey can encrypt."""
        return not self.revoked and not self.expired and self.can_encrypt

    @property
    def usable_for_signing(self) -> bool:
        return not self.revoked and not self.expired and self.can_sign and self.secret


def _unescape(field: str) -> str:
    """Undo gpg's colon-listing escapes (\\x3a for ':' and control characters)."""
    raw = re.sub(rb"\\x([0-9a-fA-F]{2})", lambda m: bytes([int(m.group(1), 16)]),
                 field.encode("utf-8", "surrogateescape"))
    return raw.decode("utf-8", "replace")


def _ts(value: str) -> datetime | None:
    return datetime.fromtimestamp(int(value), UTC) if value.isdigit() else None


MIN_BITS = 2048  # RSA and Elgamal encryption keys shorter than this are refused
_SHORT_ALGOS = frozenset({"1", "2", "16", "20"})  # RSA, RSA-E, Elgamal: strength is length


def _encryption_key(f: list[str], now: datetime) -> tuple[str, datetime | None] | None:
    """(algorithm as named in listings, expiry) of a pub/sub record that can encrypt now."""
    expires = _ts(f[6])
    if "e" not in f[11] or f[1] in ("r", "e", "i") or (expires and expires <= now):
        return None
    weak = f[3] in _SHORT_ALGOS and f[2].isdigit() and int(f[2]) < MIN_BITS
    return (f"{_ALGOS.get(f[3], f'algo{f[3]}')}{f[2]}" if weak else ""), expires


def _encrypt_expiry(enc: list[tuple[str, datetime | None]],
                    primary: datetime | None) -> datetime | None:
    """The last encryption key's expiry, no later than the primary's (None: never)."""
    if not enc or any(e is None for e in (x for _, x in enc)):
        return primary
    last = max(e for _, e in enc if e is not None)
    return min(last, primary) if primary else last


def parse_key_listing(text: str, *, now: datetime | None = None) -> list[KeyInfo]:
    """Keys from ``gpg --with-colons`` output (list, --with-secret, or --show-keys)."""
    now = now or datetime.now(UTC)
    keys: list[KeyInfo] = []
    cur: dict | None = None

    def flush() -> None:
        if cur and cur["fpr"]:
            expires = _ts(cur["f"][6])
            enc = cur["enc"]
            keys.append(KeyInfo(
                fingerprint=cur["fpr"], addresses=tuple(dict.fromkeys(cur["addrs"])),
                uids=tuple(cur["uids"]), created=_ts(cur["f"][5]) or datetime.fromtimestamp(0, UTC),
                expires=expires, revoked=cur["f"][1] == "r",
                expired=cur["f"][1] == "e" or (expires is not None and expires <= now),
                can_encrypt="E" in cur["f"][11], can_sign="S" in cur["f"][11],
                secret=cur["secret"], algo=cur["algo"],
                encrypt_expires=_encrypt_expiry(enc, expires),
                weak_encryption=next((w for w, _ in enc if w), "")))

    for line in text.splitlines():
        f = line.split(":")
        if len(f) < 10:
            continue
        rec = f[0]
        if rec in ("pub", "sec"):
            flush()
            f += [""] * (18 - len(f))
            name = _ALGOS.get(f[3], f"algo{f[3]}")
            algo = f[16] if f[16] else f"{name}{f[2]}"
            cur = {"f": f, "fpr": "", "uids": [], "addrs": [], "in_sub": False, "algo": algo,
                   "secret": rec == "sec" or f[14].startswith("+"), "enc": []}
            if (own := _encryption_key(f, now)) is not None:
                cur["enc"].append(own)
        elif cur is None:
            continue
        elif rec in ("sub", "ssb"):
            cur["in_sub"] = True
            f += [""] * (18 - len(f))
            if (sub := _encryption_key(f, now)) is not None:
                cur["enc"].append(sub)
        elif rec == "fpr" and not cur["in_sub"] and not cur["fpr"]:
            cur["fpr"] = f[9].upper()
        elif rec == "uid" and f[1] not in ("r", "e"):
            uid = _unescape(f[9])
            cur["uids"].append(uid)
            addr = parseaddr(uid)[1]
            if "@" in addr:
                cur["addrs"].append(addr.lower())
    flush()
    return keys
