"""Outbound PGP/MIME (RFC 3156): signed-and-encrypted mail with protected headers, signed mail.

``encrypt_bytes`` (wire bytes in and out, the relay's hot path: the body is never parsed) and
``encrypt_message`` (the same for an ``EmailMessage``) put the whole message, with its real
Subject/From/To/Cc/Date/Message-ID and every other header (the "protected-headers=v1" convention
of Thunderbird and draft-autocrypt-lamps-protected-headers), inside one OpenPGP message that is
signed and encrypted in a single gpg pass (RFC 3156 §6.2). The outer message keeps only what
transport and threading need (``OUTER_KEEP``); its Subject is ``ENCRYPTED_SUBJECT`` so the real
one never leaves the ciphertext. Bcc goes nowhere.

``sign_message`` builds multipart/signed (RFC 3156 §5) for recipients allowed plaintext: the
signed part is made 7bit-safe and signed in the canonical CRLF form, and it is built so that
serialising the result reproduces exactly the signed bytes.
"""

from __future__ import annotations

import base64
import copy
import io
import quopri
import re
import secrets
from email import policy
from email.generator import BytesGenerator
from email.message import EmailMessage, Message, MIMEPart
from email.parser import BytesHeaderParser, BytesParser

from mailhub.crypto.autocrypt import unfold
from mailhub.crypto.openpgp_ops import detached_signature, sign_encrypt

ENCRYPTED_SUBJECT = "..."
ENCRYPTED_PREAMBLE = "This is an OpenPGP/MIME encrypted message (RFC 4880 and 3156)"
SIGNED_PREAMBLE = "This is an OpenPGP/MIME signed message (RFC 4880 and 3156)"
# Headers the outer, visible message keeps: addressing, threading, loop prevention (as the
# S/MIME side). Reply-To is not routing and its display name can name the patient: inside only.
OUTER_KEEP = ("from", "sender", "to", "cc", "date", "message-id", "in-reply-to", "references",
              "auto-submitted")
# Never sent: Bcc would disclose blind recipients, and so would the submission hop's trace
# fields ("Received: ... for <bcc@...>", internal hosts and addresses); the client's own
# Autocrypt/OpenPGP headers would advertise the coordinator's personal key instead of the
# hub's; our own trust header.
DROPPED = ("bcc", "resent-bcc", "received", "return-path", "delivered-to", "x-original-to",
           "autocrypt", "autocrypt-gossip", "openpgp", "mailhub-protection", "mime-version")
_FLAT = policy.SMTP  # CRLF, 8bit allowed inside the ciphertext
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_LINE_END = re.compile(rb"\r?\n")
_FIELD_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")
_VERSION_PART = (b"Content-Type: application/pgp-encrypted\r\n"
                 b"Content-Description: PGP/MIME version identification\r\n\r\nVersion: 1\r\n")
_BODY_HEAD = (b'Content-Type: application/octet-stream; name="encrypted.asc"\r\n'
              b"Content-Description: OpenPGP encrypted message\r\n"
              b'Content-Disposition: inline; filename="encrypted.asc"\r\n'
              b"Content-Transfer-Encoding: 7bit\r\n\r\n")


def _flatten(part: Message) -> bytes:
    buf = io.BytesIO()
    BytesGenerator(buf, mangle_from_=False, policy=_FLAT).flatten(part)
    return buf.getvalue()


def _boundary() -> str:
    return f"mh-{secrets.token_hex(16)}"


def _share_content(src: Message, dst: Message, *, deep: bool = False) -> None:
    """Give ``dst`` the body of ``src`` (the same objects, or copies when ``deep``)."""
    payload = src.get_payload()
    dst.set_payload(copy.deepcopy(payload) if deep and isinstance(payload, list) else payload)
    dst.preamble = src.preamble
    dst.epilogue = src.epilogue
    dst.set_default_type(src.get_default_type())


def _visible_headers(msg: Message) -> EmailMessage:
    """The headers of a signed-only message: all of them, less the dropped ones."""
    outer = EmailMessage(policy=policy.default)
    for name, value in msg.items():
        lname = name.lower()
        if lname not in DROPPED and not lname.startswith("content-"):
            outer[name] = value
    outer["MIME-Version"] = "1.0"
    return outer


def _add_autocrypt(outer: EmailMessage, autocrypt_header: str | None) -> None:
    if autocrypt_header:
        outer["Autocrypt"] = unfold(autocrypt_header)


def split_header_fields(raw: bytes) -> tuple[list[tuple[str, bytes]], bytes]:
    """(lower-case name, raw field bytes ending in CRLF) for each header field, and the body.

    Works on bytes so the body is never parsed or re-encoded: the relay's hot path.
    """
    if raw.startswith((b"\r\n", b"\n")):
        return [], raw.lstrip(b"\r").removeprefix(b"\n")
    m = _BLANK_LINE.search(raw)
    head, body = (raw, b"") if m is None else (raw[:m.start()], raw[m.end():])
    fields: list[tuple[str, bytes]] = []
    for line in _LINE_END.split(head):
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + line + b"\r\n")
        else:
            m = _FIELD_NAME.match(line)
            if m:  # anything else (an mbox "From " line, garbage) is not a header field
                fields.append((m.group(1).lower().decode("ascii"), line + b"\r\n"))
    return fields, body


def fold_header(name: str, value: str, width: int = 78) -> bytes:
    """``Name: value`` folded at spaces so lines stay within ``width`` where words allow."""
    lines, cur = [], f"{name}:"
    for word in unfold(value).split(" "):
        if not word:
            continue
        if len(cur) + 1 + len(word) > width and cur != f"{name}:":
            lines.append(cur)
            cur = ""
        cur += " " + word
    lines.append(cur)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def _with_protected_param(field: bytes) -> bytes:
    return field.rstrip(b"\r\n") + b'; protected-headers="v1"\r\n'


def _encrypt_parts(raw: bytes, gnupghome: str, recipients: list[str], signer: str,
                   autocrypt_header: str | None, passphrase: str | None) -> tuple[bytes, bytes]:
    """(outer header block without Content-Type, armored ciphertext of the inner entity)."""
    fields, body = split_header_fields(raw)
    inner = [f for name, f in fields if name not in DROPPED and name != "content-type"]
    ctype = next((f for name, f in fields if name == "content-type"), None)
    inner.insert(0, _with_protected_param(ctype) if ctype else
                 b'Content-Type: text/plain; charset="us-ascii"; protected-headers="v1"\r\n')
    armored = sign_encrypt(gnupghome, b"".join((*inner, b"\r\n", body)), recipients, signer,
                           passphrase=passphrase)
    out = [f for name, f in fields if name in OUTER_KEEP]
    out.append(f"Subject: {ENCRYPTED_SUBJECT}\r\nMIME-Version: 1.0\r\n".encode())
    if autocrypt_header:
        out.append(fold_header("Autocrypt", autocrypt_header))
    return b"".join(out), crlf_lines(armored)


def crlf_lines(text: bytes) -> bytes:
    """Every line end CRLF. gpg's armor ends lines with LF alone, and asking whether a CR is
    there at all is a one-byte search, much cheaper than a search for CRLF in 270 KB."""
    if b"\r" in text:
        text = text.replace(b"\r\n", b"\n")
    return text.replace(b"\n", b"\r\n")


def encrypt_bytes(raw: bytes, *, gnupghome: str, recipients: list[str], signer: str,
                  autocrypt_header: str | None = None, passphrase: str | None = None) -> bytes:
    """``encrypt_message`` on wire bytes, without parsing the body: one gpg run, some slicing.

    This is the relay's hot path: pass the message as received, send what comes back.
    """
    head, armored = _encrypt_parts(raw, gnupghome, recipients, signer, autocrypt_header,
                                   passphrase)
    b = _boundary().encode()
    # one join: each ``+`` after the 270 KB armor would copy it into a fresh allocation
    return b"".join((head, b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";'
                     b'\r\n boundary="', b, b'"\r\n\r\n', ENCRYPTED_PREAMBLE.encode(), b"\r\n--",
                     b, b"\r\n", _VERSION_PART, b"\r\n--", b, b"\r\n", _BODY_HEAD, armored,
                     b"\r\n--", b, b"--\r\n"))


def encrypt_message(msg: Message, *, gnupghome: str, recipients: list[str], signer: str,
                    autocrypt_header: str | None = None,
                    passphrase: str | None = None) -> EmailMessage:
    """Sign and encrypt ``msg`` to ``recipients`` (fingerprints) as RFC 3156 PGP/MIME.

    Callers holding the wire bytes should prefer ``encrypt_bytes`` (no parse, no re-serialise).
    """
    head, armored = _encrypt_parts(_flatten(msg), gnupghome, recipients, signer,
                                   autocrypt_header, passphrase)
    outer: EmailMessage = BytesHeaderParser(policy=policy.default).parsebytes(head)  # type: ignore[assignment]
    parts = [BytesParser(policy=policy.default).parsebytes(_VERSION_PART),
             BytesHeaderParser(policy=policy.default).parsebytes(_BODY_HEAD)]
    parts[1].set_payload(armored.decode("ascii"))
    outer["Content-Type"] = (f'multipart/encrypted; protocol="application/pgp-encrypted"; '
                             f'boundary="{_boundary()}"')
    outer.set_payload(parts)
    outer.preamble = ENCRYPTED_PREAMBLE
    return outer


# -- multipart/signed ---------------------------------------------------------------------

_TRAILING_WS = re.compile(rb"[ \t]\r?$", re.MULTILINE)
_FROM_LINE = re.compile(rb"^From ", re.MULTILINE)


_NOT_7BIT = re.compile(rb"[\x00\x7f-\xff]|\r(?!\n)|[^\r\n]{77}")


def _clean_7bit(raw: bytes, *, text: bool) -> bool:
    """True when the bytes survive any transport unchanged (so a signature stays valid)."""
    if _NOT_7BIT.search(raw):
        return False
    return not (text and (_TRAILING_WS.search(raw) or _FROM_LINE.search(raw)))


def _quoted_printable(raw: bytes) -> str:
    lf = raw.replace(b"\r\n", b"\n")
    encoded = quopri.encodestring(lf, quotetabs=False)
    return _FROM_LINE.sub(b"=46rom ", encoded).decode("ascii")


def make_7bit_safe(part: Message) -> None:
    """Re-encode every leaf that is not transport-safe: text as quoted-printable, else base64."""
    for leaf in part.walk():
        cte = str(leaf.get("Content-Transfer-Encoding", "7bit")).strip().lower()
        if leaf.is_multipart():
            if cte not in ("7bit", ""):
                del leaf["Content-Transfer-Encoding"]
            continue
        if cte in ("base64", "quoted-printable"):
            continue
        raw = leaf.get_payload(decode=True) or b""
        is_text = leaf.get_content_maintype() == "text"
        if _clean_7bit(raw, text=is_text):
            continue
        if is_text:
            leaf.set_payload(_quoted_printable(raw))
            new_cte = "quoted-printable"
        else:
            leaf.set_payload(base64.encodebytes(raw).decode("ascii"))
            new_cte = "base64"
        del leaf["Content-Transfer-Encoding"]
        leaf["Content-Transfer-Encoding"] = new_cte


def _signed_entity(msg: Message) -> tuple[EmailMessage, bytes]:
    """The content part to sign, and the exact bytes that serialising it will produce."""
    content = MIMEPart(policy=policy.default)
    for name, value in msg.items():
        if name.lower().startswith("content-"):
            content[name] = value
    _share_content(msg, content, deep=True)
    make_7bit_safe(content)
    # Parse what we would send, and sign what that parse serialises to: a fixed point, so the
    # bytes between the boundaries are exactly the signed bytes whoever serialises the result.
    part = BytesParser(policy=policy.default).parsebytes(_flatten(content))
    return part, _flatten(part)  # type: ignore[return-value]


def sign_message(msg: Message, *, gnupghome: str, signer: str,
                 autocrypt_header: str | None = None,
                 passphrase: str | None = None) -> EmailMessage:
    """A multipart/signed copy of ``msg`` (RFC 3156 §5); headers stay visible, Bcc is dropped."""
    part, data = _signed_entity(msg)
    sig = detached_signature(gnupghome, data, signer, passphrase=passphrase)
    outer = _visible_headers(msg)
    _add_autocrypt(outer, autocrypt_header)

    sig_part = MIMEPart(policy=policy.default)
    sig_part["Content-Type"] = 'application/pgp-signature; name="signature.asc"'
    sig_part["Content-Description"] = "OpenPGP digital signature"
    sig_part["Content-Disposition"] = 'attachment; filename="signature.asc"'
    sig_part.set_payload(sig.armored.decode("ascii"))

    outer["Content-Type"] = (f'multipart/signed; micalg="{sig.micalg}"; '
                             f'protocol="application/pgp-signature"; boundary="{_boundary()}"')
    outer.set_payload([part, sig_part])
    outer.preamble = SIGNED_PREAMBLE
    return outer
