"""SMTP on the wire for the delivery client: replies, envelope commands and the DATA payload.

Pure functions over bytes plus one small buffered reader, so that the client can pipeline
(RFC 2920): several replies that arrive in one TCP segment are read with one ``recv``. Replies are
parsed as smtplib parses them (lines split on LF, text stripped, lines of a multi-line reply
joined by "\\n", a code that is not three digits is -1), so outcomes map as they always did.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

CRLF = b"\r\n"
MAX_LINE = 8192  # as smtplib: a longer reply line is a protocol error
MAX_REPLY = 65536  # a multi-line reply past this is too (else an endless one fills memory)
_EOL = re.compile(rb"\r\n|\r|\n")
_DOT_LINE = re.compile(rb"\n\.")
_LEADING_DOT = re.compile(rb"^\.", re.M)
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")
_PLAIN_ADDRESS = re.compile(r"[^\s<>()\[\]\",;:\\]*")  # what parseaddr returns unchanged


class Disconnected(ConnectionError):
    """The server closed the connection (where a reply was due)."""


class ReplyTooLong(ValueError):
    """A reply line past ``MAX_LINE``: the stream cannot be trusted any more."""


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    text: str

    @property
    def enhanced(self) -> str:
        """The RFC 3463 status code at the start of the text ("5.1.1"), or ""."""
        m = _ENHANCED.match(self.text)
        return m.group(0).rstrip() if m and str(self.code)[:1] == m.group(1) else ""

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


def parse_reply(buf: bytes | bytearray, start: int = 0) -> tuple[Reply, int] | None:
    """The complete reply at ``buf[start:]`` and the offset after it, or None if more bytes
    are needed."""
    lines: list[bytes] = []
    pos = start
    code = -1
    while True:
        if pos - start > MAX_REPLY:
            raise ReplyTooLong("reply too long")
        end = buf.find(b"\n", pos)
        if end < 0:
            if len(buf) - pos > MAX_LINE:
                raise ReplyTooLong("reply line too long")
            return None
        if end - pos > MAX_LINE:
            raise ReplyTooLong("reply line too long")
        line = bytes(buf[pos:end + 1])
        pos = end + 1
        code = int(line[:3]) if line[:3].isdigit() else -1
        lines.append(line[4:].strip(b" \t\r\n"))
        if line[3:4] != b"-":
            break
    return Reply(code, b"\n".join(lines).decode("utf-8", "replace")), pos


class ReplyReader:
    """Buffered replies from ``recv`` (a socket's): one read serves every reply it brought."""

    def __init__(self, recv: Callable[[int], bytes]) -> None:
        self._recv = recv
        self._buf = bytearray()
        self._pos = 0

    def read(self) -> Reply:
        while True:
            parsed = parse_reply(self._buf, self._pos)
            if parsed is not None:
                reply, self._pos = parsed
                if self._pos == len(self._buf):
                    self._buf.clear()
                    self._pos = 0
                return reply
            chunk = self._recv(65536)
            if not chunk:
                raise Disconnected("Connection unexpectedly closed")
            if self._pos:
                del self._buf[:self._pos]
                self._pos = 0
            self._buf += chunk


def quote_address(address: str) -> str:
    """``<address>`` as smtplib.quoteaddr makes it; the common plain address skips its parser."""
    if _PLAIN_ADDRESS.fullmatch(address):
        return f"<{address}>"
    import smtplib

    return smtplib.quoteaddr(address)


def envelope(sender: str, recipient: str, *, size: int | None,
             smtputf8: bool) -> tuple[bytes, bytes]:
    """MAIL FROM and RCPT TO for one recipient (UTF-8 only with SMTPUTF8; else ASCII, which
    raises UnicodeEncodeError for an address that needs SMTPUTF8)."""
    params = (f" SIZE={size}" if size is not None else "") + (" SMTPUTF8" if smtputf8 else "")
    encoding = "utf-8" if smtputf8 else "ascii"
    return (f"MAIL FROM:{quote_address(sender)}{params}\r\n".encode(encoding),
            f"RCPT TO:{quote_address(recipient)}\r\n".encode(encoding))


def data_payload(data: bytes, *, clean_body: bool = False) -> bytes:
    """The message as sent after DATA's 354: every line end CRLF (a bare CR or LF is one),
    a line starting with "." gets another, the last line ends with CRLF, then ".\\r\\n".

    Written for large messages: one-byte counts and the regex engine's literal search are
    several times faster than ``bytes`` searches for two-byte needles, and armored OpenPGP
    output ends its lines with LF alone (a regex substitution there cost 2 ms for 270 KB).

    ``clean_body``: the body after the header block was written by the hub's own PGP/MIME or
    S/MIME writer (CRLF line ends, MIME lines and base64 or armor: no line starts with ".";
    ``tests/crypto`` holds both writers to that), so only the header block, copied from the
    submitted message, is checked: 0.5 ms less for a 270 KB ciphertext."""
    if clean_body and data[-2:] == CRLF:
        end = data.find(b"\r\n\r\n")
        if end >= 0 and is_wire_clean(data[: end + 2]):
            return data + b".\r\n"
    n_lf, n_cr = data.count(b"\n"), data.count(b"\r")
    if n_cr == 0:
        if n_lf:
            data = data.replace(b"\n", CRLF)
    elif n_cr != n_lf or data.count(CRLF) != n_lf:
        lf_only = data.replace(CRLF, b"\n")
        data = (lf_only.replace(b"\n", CRLF) if b"\r" not in lf_only
                else _EOL.sub(CRLF, data))  # a bare CR too: the regex's care is needed
    if data[:1] == b"." or _DOT_LINE.search(data) is not None:
        data = _LEADING_DOT.sub(b"..", data)
    if data[-2:] != CRLF:
        data += CRLF
    return data + b".\r\n"


def is_wire_clean(data: bytes) -> bool:
    """Every line end CRLF and no line starting with ".": the bytes go after DATA unchanged."""
    n_lf = data.count(b"\n")
    return (data.count(b"\r") == n_lf and data.count(CRLF) == n_lf and data[:1] != b"."
            and _DOT_LINE.search(data) is None)
