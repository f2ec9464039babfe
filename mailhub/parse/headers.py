"""Header access that survives hostile input: nothing here raises on what a sender wrote.

The listeners accept mail from anyone; a Subject of 10 KB, 8-bit garbage, an encoded-word in a
charset Python does not know, CR/LF smuggled inside an encoded-word: each must come out as a
bounded, single-line, printable string, never as an exception in a listener. The stdlib's header
objects (``policy.default``) parse eagerly and have raised on such input, so this module works on
the raw stored values (``Message.raw_items``) and does its own RFC 2047 decoding.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import logging
import re
from email.header import Header
from email.message import Message
from email.utils import getaddresses

log = logging.getLogger("mailhub.parse")

MAX_HEADER_CHARS = 2000
"""Default cap on a decoded header value returned by ``safe_header`` (characters)."""

MAX_RAW_CHARS = 256 * 1024
"""Raw header text looked at per header: bounds the work a hostile header can cause."""

MAX_ADDRESS_CHARS = 320

_FOLD = re.compile(r"\r?\n(?=[ \t])")
_CONTROLS = re.compile("[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]+")
_CRLF_LIKE = re.compile("[\r\n\x00\x0b\x0c\x1c-\x1e\x85\u2028\u2029]+")
_ENCODED_WORD = re.compile(r"=\?([^?\s]{1,75})\?([bBqQ])\?([^?\s]*)\?=")
_Q_ESCAPE = re.compile(rb"=([0-9A-Fa-f]{2})")
_NOT_B64 = re.compile(r"[^A-Za-z0-9+/]")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")
_ANGLE_ADDR = re.compile(r"<([^<>\s]+@[^<>\s]+)>")
_BARE_ADDR = re.compile(r"[^\s<>,;:\"()\[\]]+@[^\s<>,;:\"()\[\]]+")


# whitespace (any, as str.isspace sees it) or a control character anywhere in an address
_ADDR_BAD_CHAR = re.compile(r"[\s\x00-\x1f\x7f]")
_DOMAIN_BAD_CHAR = re.compile(r'[<>,;()\[\]\\"@]')

def strip_crlf(value: object) -> str:
    """A header value safe to set: CR, LF and other line breaks become one space.

    For values that come from templates or case fields: a newline in a patient's name must not
    become a second header.
    """
    text = "" if value is None else str(value)
    return _CRLF_LIKE.sub(" ", text).strip()


def _to_text(value: object) -> str:
    """A stored header value as text: 8-bit bytes (surrogate-escaped) read as UTF-8 or U+FFFD."""
    if isinstance(value, Header):
        try:
            return str(value)
        except Exception:  # a Header built with a bogus charset
            return ""
    text = value if isinstance(value, str) else str(value)
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeError:
        raw = text.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace")


def raw_headers(msg: Message, name: str) -> list[str]:
    """Every value of header ``name`` (any case), unfolded, 8-bit decoded, NOT RFC 2047 decoded.

    For structured headers (addresses, Message-IDs) where decoding encoded-words first would let
    a display name smuggle commas or brackets into the structure.
    """
    wanted = name.lower()
    try:
        items = list(msg.raw_items())
    except Exception:
        try:
            items = list(msg.items())
        except Exception:
            log.warning("unreadable header block while looking for %s", name)
            return []
    out: list[str] = []
    for key, value in items:
        if str(key).lower() != wanted:
            continue
        text = _to_text(value)[:MAX_RAW_CHARS]
        out.append(_FOLD.sub("", text).replace("\r", "").replace("\n", ""))
    return out


def _decode_bytes(data: bytes, charset: str) -> str:
    """Bytes in a declared charset; unknown or lying charsets give replacement characters."""
    try:
        info = codecs.lookup(charset)
        if not getattr(info, "_is_text_encoding", True):
            raise LookupError(charset)
        return data.decode(info.name, "replace")
    except Exception:
        return data.decode("utf-8", "replace")


def _word_bytes(encoding: str, text: str) -> bytes | None:
    if encoding in "qQ":
        raw = text.replace("_", " ").encode("ascii", "replace")
        return _Q_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), raw)
    data = _NOT_B64.sub("", text)
    if len(data) % 4 == 1:
        data = data[:-1]
    try:
        return base64.b64decode(data + "=" * (-len(data) % 4))
    except (binascii.Error, ValueError):
        return None


def decode_words(value: str) -> str:
    """RFC 2047 decoding, tolerant: adjacent words in one charset are joined before decoding
    (mailers split multi-byte characters across words), whitespace between encoded-words is
    dropped, a word that cannot be decoded is left as written."""
    pieces: list[str] = []
    pending: bytes = b""
    pending_cs = ""
    last_end = 0
    last_was_word = False
    for m in _ENCODED_WORD.finditer(value):
        gap = value[last_end : m.start()]
        charset = m.group(1).split("*", 1)[0].lower()
        data = _word_bytes(m.group(2), m.group(3))
        if data is None:
            if pending:
                pieces.append(_decode_bytes(pending, pending_cs))
                pending = b""
            pieces.append(gap + m.group(0))
            last_was_word = False
            last_end = m.end()
            continue
        adjacent = last_was_word and not gap.strip(" \t")
        if not adjacent:
            if pending:
                pieces.append(_decode_bytes(pending, pending_cs))
                pending = b""
            pieces.append(gap)
        elif pending and charset != pending_cs:
            pieces.append(_decode_bytes(pending, pending_cs))
            pending = b""
        pending += data
        pending_cs = charset
        last_was_word = True
        last_end = m.end()
    if pending:
        pieces.append(_decode_bytes(pending, pending_cs))
    pieces.append(value[last_end:])
    return "".join(pieces)


def safe_header(msg: Message, name: str, limit: int = MAX_HEADER_CHARS) -> str:
    """The first ``name`` header, decoded for display or comparison; ``""`` when absent.

    Encoded-words decoded, undecodable bytes as U+FFFD, CR/LF and other control characters
    replaced by spaces (also those hidden inside encoded-words), trimmed, at most ``limit``
    characters. Never raises.
    """
    try:
        values = raw_headers(msg, name)
        if not values:
            return ""
        text = decode_words(values[0])
    except Exception:  # defence in depth: a listener must never die on a header
        log.warning("header %s could not be decoded; using an empty value", name)
        return ""
    text = _CONTROLS.sub(" ", text).replace("\t", " ").strip()
    return text[: max(limit, 0)]


def normalize_address(value: str | None) -> str | None:
    """``local@domain`` with the domain lowercased and the local part kept, or None.

    The single comparison form for addresses everywhere (patients, participants, partners):
    RFC 5321 leaves the local part's case to the receiving system, so it is not folded.
    """
    if not isinstance(value, str):
        return None
    if len(value) > 2 * MAX_ADDRESS_CHARS:  # not kept: the cache holds only short strings
        return _normalize_text.__wrapped__(value)
    return _normalize_text(value)


@functools.lru_cache(maxsize=4096)  # the same few addresses recur in every message
def _normalize_text(value: str) -> str | None:
    text = value.strip().strip("<>").strip()
    if not text or len(text) > MAX_ADDRESS_CHARS:
        return None
    local, sep, domain = text.rpartition("@")
    domain = domain.rstrip(".")
    if not sep or not local or not domain:
        return None
    if _ADDR_BAD_CHAR.search(text) or _DOMAIN_BAD_CHAR.search(domain):
        return None
    return f"{local}@{domain.lower()}"


def _fallback_addresses(raw: str) -> list[str]:
    """Addresses from a value ``getaddresses`` choked on: quoted phrases and comments removed
    first so that ``"evil@x" <real@y>`` yields only the real address."""
    text = _COMMENT.sub(" ", _QUOTED.sub(" ", raw))
    angle = _ANGLE_ADDR.findall(text)
    return angle if angle else _BARE_ADDR.findall(text)


_PLAIN_LOCAL = r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*"
_PLAIN_DOMAIN = r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
# one mailbox as most clients write it: ``local@domain``, ``<local@domain>`` or
# ``Some Name <local@domain>``
_PLAIN_MAILBOX = re.compile(
    rf"[ \t]*(?:(?:[A-Za-z0-9]+(?:[ \t]+[A-Za-z0-9]+)*[ \t]*)?<({_PLAIN_LOCAL}@{_PLAIN_DOMAIN})>"
    rf"|({_PLAIN_LOCAL}@{_PLAIN_DOMAIN}))[ \t]*")


def _plain_mailboxes(raw: str) -> list[str] | None:
    """The addresses of a value made only of plain mailboxes, as ``getaddresses`` reads them;
    None for anything else (then the RFC 5322 parser decides). Most values are plain, and the
    parser costs more than the rest of a message's policy."""
    found = []
    for part in raw.split(","):
        m = _PLAIN_MAILBOX.fullmatch(part)
        if m is None:
            return None
        found.append(m.group(1) or m.group(2))
    return found


def addresses(msg: Message, *names: str) -> list[str]:
    """Addresses from the named headers (e.g. ``"To", "Cc"``), normalized, deduplicated in order.

    Encoded-words are not decoded before parsing (an encoded display name must not inject an
    address). Never raises; a value nobody can parse contributes nothing.
    """
    out: list[str] = []
    seen: set[str] = set()
    for name in names:
        for raw in raw_headers(msg, name):
            plain = _plain_mailboxes(raw)
            if plain is not None:
                found = plain
            else:
                try:
                    pairs = getaddresses([raw])
                    found = [addr for _, addr in pairs if addr]
                except Exception:
                    found = []
            if not any(normalize_address(a) for a in found) and "@" in raw:
                found = _fallback_addresses(raw)
            for addr in found:
                norm = normalize_address(addr)
                if norm is not None and norm not in seen:
                    seen.add(norm)
                    out.append(norm)
    return out
