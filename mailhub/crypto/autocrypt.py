"""Autocrypt Level 1: read peers' ``Autocrypt:`` headers, keep their state, write our own header.

Everything here is pure: the caller stores ``PeerState`` wherever it keeps keys, imports
``keydata`` through ``Keyring.import_public`` (which refuses secret, expired and revoked keys),
and decides policy. Rules follow https://autocrypt.org/level1.html (header format, peer-state
update, recommendation); messages that are DSNs or mailing-list traffic should not be fed in.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from mailhub.errors import MailhubError

PREFER_MUTUAL = "mutual"
NO_PREFERENCE = "nopreference"
HEADER = "Autocrypt"
_KNOWN = ("addr", "prefer-encrypt", "keydata")
_LINE = 76  # base64 characters per folded line
_EPOCH = datetime.fromtimestamp(0, UTC)


class AutocryptError(MailhubError):
    """An Autocrypt header that cannot be read (no addr, no keydata, broken base64, ...)."""


@dataclass(frozen=True)
class AutocryptHeader:
    addr: str  # lower-cased
    prefer_encrypt: str  # "mutual" | "nopreference"
    keydata: bytes  # the binary OpenPGP public key (transferable public key packets)


@dataclass(frozen=True)
class PeerState:
    """peers[addr] of the Level 1 spec."""

    addr: str
    last_seen: datetime
    autocrypt_timestamp: datetime | None = None
    public_key: bytes | None = None
    prefer_encrypt: str = NO_PREFERENCE


def _is_public_key_packet(data: bytes) -> bool:
    """The first packet is a public key (tag 6), in old or new packet format."""
    if not data:
        return False
    first = data[0]
    if not first & 0x80:
        return False
    tag = first & 0x3F if first & 0x40 else (first >> 2) & 0x0F
    return tag == 6


def parse_header(value: str) -> AutocryptHeader | None:
    """One Autocrypt header value; None when the spec says to ignore it (unknown critical attr).

    Raises ``AutocryptError`` for garbage: missing addr or keydata, bad base64, not a public key.
    """
    attrs: dict[str, str] = {}
    for item in str(value).split(";"):
        if not item.strip():
            continue
        name, sep, val = item.partition("=")
        name = name.strip().lower()
        if not sep or not name:
            raise AutocryptError(f"Autocrypt header attribute without a value: {item.strip()[:40]!r}")
        if name in attrs:
            raise AutocryptError(f"Autocrypt header repeats the attribute {name!r}")
        attrs[name] = val.strip()
    unknown_critical = [n for n in attrs if n not in _KNOWN and not n.startswith("_")]
    if unknown_critical:
        return None
    addr = attrs.get("addr", "").strip().strip("<>").lower()
    if "@" not in addr:
        raise AutocryptError("Autocrypt header without a valid addr attribute")
    if not attrs.get("keydata"):
        raise AutocryptError(f"Autocrypt header for {addr} has no keydata")
    try:
        keydata = base64.b64decode(re.sub(r"\s+", "", attrs["keydata"]), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AutocryptError(f"Autocrypt keydata for {addr} is not valid base64") from exc
    if not _is_public_key_packet(keydata):
        raise AutocryptError(f"Autocrypt keydata for {addr} is not an OpenPGP public key")
    prefer = PREFER_MUTUAL if attrs.get("prefer-encrypt", "").lower() == PREFER_MUTUAL \
        else NO_PREFERENCE
    return AutocryptHeader(addr, prefer, keydata)


def select_header(values: list[str], from_addr: str) -> AutocryptHeader | None:
    """The message's usable header: exactly one valid header whose addr is the From address."""
    parsed = []
    for value in values:
        try:
            header = parse_header(value)
        except AutocryptError:
            continue
        if header is not None and header.addr == from_addr.strip().lower():
            parsed.append(header)
    return parsed[0] if len(parsed) == 1 else None


def make_header(addr: str, public_key_binary: bytes, prefer_encrypt: bool) -> str:
    """Our header value, folded (CRLF + space) so no line passes 78 characters.

    An ``EmailMessage`` refuses line breaks in values: set ``unfold(value)`` there, and the
    generator folds it again at the same spaces.
    """
    if not _is_public_key_packet(public_key_binary):
        raise AutocryptError("Autocrypt keydata must be a binary OpenPGP public key")
    b64 = base64.b64encode(public_key_binary).decode("ascii")
    first = f"addr={addr}; " + ("prefer-encrypt=mutual; " if prefer_encrypt else "") + "keydata="
    lines = [first] + [" " + b64[i:i + _LINE] for i in range(0, len(b64), _LINE)]
    return "\r\n".join(lines)


def unfold(value: str) -> str:
    """A folded header value on one line (folds become single spaces)."""
    return re.sub(r"\r?\n[ \t]+", " ", value).strip()


def effective_date(message_date: datetime | None, now: datetime | None = None) -> datetime:
    """The message's Date, or now when it is missing or in the future (spec: effective date)."""
    now = now or datetime.now(UTC)
    if message_date is None:
        return now
    if message_date.tzinfo is None:
        message_date = message_date.replace(tzinfo=UTC)
    return min(message_date, now)


def update_peer(state: PeerState | None, header: AutocryptHeader | None,
                message_date: datetime | None, from_addr: str, *,
                now: datetime | None = None) -> PeerState:
    """The Level 1 peer-state update for one incoming message from ``from_addr``."""
    addr = from_addr.strip().lower()
    date = effective_date(message_date, now)
    if header is not None and header.addr != addr:
        header = None  # a header for someone else is ignored
    if state is None:
        state = PeerState(addr=addr, last_seen=_EPOCH)
    if header is None:
        return replace(state, last_seen=date) if date > state.last_seen else state
    if state.autocrypt_timestamp is not None and date < state.autocrypt_timestamp:
        return state  # an older message: what we know is newer
    return PeerState(addr=addr, last_seen=max(state.last_seen, date), autocrypt_timestamp=date,
                     public_key=header.keydata, prefer_encrypt=header.prefer_encrypt)


def recommend(state: PeerState | None, *, own_prefer_mutual: bool,
              reply_to_encrypted: bool = False) -> str:
    """Level 1 recommendation: "disable" | "discourage" | "available" | "encrypt"."""
    if state is None or not state.public_key or state.autocrypt_timestamp is None:
        return "disable"
    stale = state.autocrypt_timestamp < state.last_seen - timedelta(days=35)
    preliminary = "discourage" if stale else "available"
    if preliminary == "available" and own_prefer_mutual and state.prefer_encrypt == PREFER_MUTUAL:
        return "encrypt"
    if reply_to_encrypted:
        return "encrypt"
    return preliminary
