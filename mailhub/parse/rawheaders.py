"""Edit a raw message's header block without re-serialising the message.

Re-generating a message through the ``email`` package can re-fold headers and re-encode bodies;
a signed or 8-bit body must travel byte for byte, so the hub edits headers on the raw bytes.
"""

from __future__ import annotations

import re

# A bare CR ends a header line too, as it does for Python's parser and many readers: otherwise
# "X: a\rMailhub-Protection: ..." is one field here and two fields downstream.
_EOL = re.compile(rb"\r\n|\r|\n")
_BLANK = re.compile(rb"\r?\n\r?\n")


def split_message(raw: bytes) -> tuple[list[bytes], bytes, bytes]:
    """Return (header lines with their continuations joined, line ending, body)."""
    m = _BLANK.search(raw)
    body = b"" if m is None else raw[m.end():]
    fields, eol = _fields(raw, m)
    return fields, eol, body


def _fields(raw: bytes, m: re.Match[bytes] | None) -> tuple[list[bytes], bytes]:
    """The header fields before the blank line ``m`` found (continuations joined)."""
    head = raw if m is None else raw[: m.start()]
    eol = b"\r\n" if b"\r\n" in raw[: (m.end() if m else len(raw))] else b"\n"
    fields: list[bytes] = []
    for line in _EOL.split(head):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += eol + line
        elif line:
            fields.append(line)
    return fields, eol


def field_name(field: bytes) -> str:
    return field.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def join_message(fields: list[bytes], eol: bytes, body: bytes) -> bytes:
    return eol.join(fields) + eol + eol + body


def remove_headers(raw: bytes, names: set[str]) -> bytes:
    fields, eol, body = split_message(raw)
    kept = [f for f in fields if field_name(f) not in names]
    return join_message(kept, eol, body) if len(kept) != len(fields) else raw


def prepend_headers(raw: bytes, headers: list[tuple[str, str]]) -> bytes:
    """Add headers at the top (values must already be CR/LF-free)."""
    fields, eol, body = split_message(raw)
    new = [f"{name}: {value}".encode() for name, value in headers]
    return join_message(new + fields, eol, body)


def get_header(raw: bytes, name: str) -> str | None:
    """First value of a header, unfolded, as text (undecoded encoded-words kept).

    Only the header block is read: the body (200 KiB and more) is not copied."""
    fields, _ = _fields(raw, _BLANK.search(raw))
    lname = name.lower()
    for f in fields:
        if field_name(f) == lname:
            value = f.split(b":", 1)[1] if b":" in f else b""
            return re.sub(rb"\r?\n[ \t]+", b" ", value).strip().decode("utf-8", "replace")
    return None
