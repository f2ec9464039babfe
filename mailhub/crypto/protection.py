"""The ``Mailhub-Protection`` header: how an inbound message was protected, as the hub found it.

The hub sets exactly one on every inbound message it delivers or files, and strips every copy
that arrived from outside (also from inside encrypted parts once decrypted): a sender must not be
able to claim "verified" by writing the header themselves.

Format (part of the product contract)::

    Mailhub-Protection: encryption=openpgp|smime|none; signature=verified|invalid|unknown-key|none;
     signer=<signer>

``signer`` is an OpenPGP primary key fingerprint (40 hex) or an S/MIME certificate subject as an
RFC 4514 string; it is left out when there is no signature (or no signer is known).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.message import Message

from mailhub.errors import MailhubError

HEADER = "Mailhub-Protection"
ENCRYPTIONS = ("openpgp", "smime", "none")
SIGNATURES = ("verified", "invalid", "unknown-key", "none")
_VALUE_RE = re.compile(r"^encryption=([a-z-]+);\s*signature=([a-z-]+)(?:;\s*signer=(.+))?$",
                       re.DOTALL)


class ProtectionHeaderError(MailhubError):
    """A Mailhub-Protection value that does not follow the format."""


@dataclass(frozen=True)
class Protection:
    encryption: str
    signature: str
    signer: str | None = None


def format_protection(encryption: str, signature: str, signer: str | None = None) -> str:
    """The header value; ``signer`` is dropped when the signature is "none" or it is empty."""
    if encryption not in ENCRYPTIONS:
        raise ValueError(f"encryption must be one of {ENCRYPTIONS}, not {encryption!r}")
    if signature not in SIGNATURES:
        raise ValueError(f"signature must be one of {SIGNATURES}, not {signature!r}")
    value = f"encryption={encryption}; signature={signature}"
    signer = " ".join((signer or "").split())  # no line breaks from a certificate subject
    if signature != "none" and signer:
        value += f"; signer={signer}"
    return value


def parse_protection(value: str) -> Protection:
    """Read a header value back (unfolded; whitespace runs from folding are collapsed)."""
    text = " ".join(str(value).split())
    m = _VALUE_RE.match(text)
    if not m or m.group(1) not in ENCRYPTIONS or m.group(2) not in SIGNATURES:
        raise ProtectionHeaderError(f"not a {HEADER} value: {text[:120]!r}")
    signer = m.group(3).strip() if m.group(3) else None
    if m.group(2) == "none":
        signer = None
    return Protection(m.group(1), m.group(2), signer or None)


def strip_protection_headers(msg: Message) -> int:
    """Delete every Mailhub-Protection header in the message and all its parts; the count."""
    removed = 0
    for part in msg.walk():
        count = len(part.get_all(HEADER, []))
        if count:
            del part[HEADER]  # case-insensitive, all occurrences
            removed += count
    return removed


def set_protection(msg: Message, encryption: str, signature: str,
                   signer: str | None = None) -> None:
    """Strip incoming copies, then set the hub's own header on the top-level message."""
    strip_protection_headers(msg)
    msg[HEADER] = format_protection(encryption, signature, signer)
