"""Raw MIME entities taken apart by their bytes, for checking signatures over them.

A multipart/signed signature covers the exact bytes between the boundaries; a parsed and
re-serialised part may not reproduce them, and a parser that reads a large ciphertext line by
line costs more than the decryption. So these work on bytes: split an entity into header block
and body, find each body part by its delimiters, put line ends in RFC 3156 canonical form.
"""

from __future__ import annotations

import re
from email import policy
from email.message import EmailMessage
from email.parser import BytesHeaderParser


def _split_entity(raw: bytes) -> tuple[bytes, bytes] | None:
    """(header block, body) of a raw MIME entity; None when there is no body at all."""
    if raw.startswith((b"\r\n", b"\n")):
        return b"", raw.lstrip(b"\r").removeprefix(b"\n")
    m = re.search(rb"\r?\n\r?\n", raw)
    return None if m is None else (raw[:m.start()], raw[m.end():])


def light_entity(raw: bytes) -> EmailMessage:
    """Headers parsed, body kept as it came: no per-line parsing of a large ciphertext."""
    split = _split_entity(raw) or (raw, b"")
    msg: EmailMessage = BytesHeaderParser(policy=policy.default).parsebytes(split[0] + b"\r\n\r\n")  # type: ignore[assignment]
    msg.set_payload(split[1].decode("ascii", "surrogateescape"))
    return msg


def split_parts(raw: bytes, boundary: str) -> list[bytes] | None:
    """The raw bytes of each body part of a multipart entity (RFC 2046 delimiters)."""
    split = _split_entity(raw)
    if split is None:
        return None
    body = split[1]
    marker = b"--" + boundary.encode("utf-8", "surrogateescape")
    tail = re.compile(rb"(--)?[ \t]*(\r?\n|$)")
    parts: list[bytes] = []
    start = None
    pos = body.find(marker)
    while pos != -1:  # bytes.find, not a regex scan: ciphertexts are large
        line_start = pos == 0 or body[pos - 1:pos] == b"\n"
        m = tail.match(body, pos + len(marker)) if line_start else None
        if m:
            cut = pos - (2 if body[pos - 2:pos] == b"\r\n" else 1) if pos else 0
            if start is not None:
                parts.append(body[start:cut])
            if m.group(1):  # the close delimiter
                return parts
            start = m.end()
        pos = body.find(marker, pos + len(marker))
    return parts if parts else None


def canonical(data: bytes) -> bytes:
    """RFC 3156 canonical form: every line ending CRLF."""
    return re.sub(rb"\r?\n", b"\r\n", data)
