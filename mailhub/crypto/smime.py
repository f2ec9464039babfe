"""Outbound S/MIME (RFC 8551): sign, then envelope, with the real headers protected inside.

The raw-MIME helpers at the top are shared with the inbound side (smime_inbound), which must
work on exact bytes because a detached signature covers them.

The shape is what Thunderbird, Outlook and Apple Mail read: application/pkcs7-mime
(smime-type=enveloped-data) whose plaintext is a multipart/signed entity; the signed entity
carries the real Subject/From/To/... (protected-headers="v1") and the outer Subject is "...".
The MIME around the DER is built here by hand (base64 of the DER), which is much cheaper than
cryptography's S/MIME text encoder. The *_bytes variants take PEM so a worker process can run
them; parsed keys are cached per process.
"""

from __future__ import annotations

import base64
import binascii
import email.encoders
import email.header
import email.policy
import functools
import logging
import quopri
import re
import secrets
from collections.abc import Sequence
from email.generator import BytesGenerator
from email.message import EmailMessage, Message
from email.parser import BytesParser
from io import BytesIO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.serialization import pkcs7

from mailhub.crypto.certs import Identity, load_certs, load_identity
from mailhub.errors import CryptoError, DecryptionFailed

log = logging.getLogger("mailhub.crypto")

PROTECTED_SUBJECT = "..."
CRLF = b"\r\n"
# Headers that stay readable on the encrypted envelope (routing and threading need them).
OUTER_KEEP = frozenset(
    {"from", "sender", "to", "cc", "date", "message-id", "in-reply-to", "references",
     "auto-submitted"}
)
# Headers that go nowhere: Bcc must not leak, trace fields describe the submission hop.
DROP = frozenset({"bcc", "resent-bcc", "received", "return-path", "delivered-to", "x-original-to"})
_MAX_LINE = 998  # RFC 5322 line limit; relays may fold longer lines
_SIGNED_OPTIONS = [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary]

_FIELD_NAME = re.compile(rb"[!-9;-~]+[ \t]*:")  # RFC 5322 field name (an mbox "From " is not)
Field = tuple[str, bytes]  # (lower-case name, the whole raw field including folds and CRLF)


# --- raw MIME helpers (pure) --------------------------------------------------------------


def to_crlf(data: bytes) -> bytes:
    """Canonical line ends: every line ends in CRLF (what is signed is canonical text).

    Mail from SMTP is CRLF already: two counts tell, without the two copies (0.3 ms for
    200 KiB) that rewriting it would cost."""
    if data.count(b"\n") == data.count(CRLF):
        return data
    return data.replace(CRLF, b"\n").replace(b"\n", CRLF)


def split_message(raw: bytes) -> tuple[list[Field], bytes]:
    """Header fields and body of a CRLF message; lines that are not fields are dropped."""
    end = raw.find(b"\r\n\r\n")
    if raw.startswith(CRLF):
        head, body = b"", raw[2:]
    elif not _FIELD_NAME.match(raw):  # an entity without headers: all of it is body
        head, body = b"", raw
    elif end < 0:
        head, body = raw, b""
    else:
        head, body = raw[: end + 2], raw[end + 4:]
    fields: list[Field] = []
    for line in head.split(CRLF)[:-1] if head.endswith(CRLF) else head.split(CRLF):
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + line + CRLF)
        elif _FIELD_NAME.match(line):
            name = line.split(b":", 1)[0].rstrip(b" \t").decode("ascii").lower()
            fields.append((name, line + CRLF))
    return fields, body


def decode_body(headers: Message, body: bytes) -> bytes:
    """The part's body with its transfer encoding undone; strict base64 catches truncation."""
    cte = str(headers.get("content-transfer-encoding", "7bit")).strip().lower()
    if cte == "base64":
        compact = body.translate(None, b" \t\r\n")
        if len(compact) % 4:
            raise DecryptionFailed("truncated base64 in the S/MIME part")
        try:
            return base64.b64decode(compact, validate=True)
        except binascii.Error as exc:
            raise DecryptionFailed(f"corrupt base64 in the S/MIME part: {exc}") from exc
    if cte == "quoted-printable":
        return quopri.decodestring(body)
    return body


def multipart_parts(body: bytes, boundary: str) -> list[bytes]:
    """Parts of a multipart body, byte exact; the CRLF before a delimiter is not content."""
    marker = b"--" + boundary.encode("utf-8", "replace")
    parts: list[bytes] = []
    start: int | None = None
    pos = 0
    while (at := body.find(marker, pos)) >= 0:
        pos = at + 1
        if at and body[at - 2 : at] != b"\r\n":
            continue  # not at the start of a line
        after = at + len(marker)
        close = body[after : after + 2] == b"--"
        eol = body.find(b"\r\n", after)
        line_end = len(body) if eol < 0 else eol
        if body[after + 2 if close else after : line_end].strip(b" \t"):
            continue  # a longer boundary that merely starts with ours
        if start is not None:
            parts.append(body[start : max(at - 2, start)])
        if close:
            return parts
        start = pos = min(line_end + 2, len(body))
    if start is not None:
        parts.append(body[start:])
    return parts


def _is_content(name: str) -> bool:
    return name.startswith("content-")


def _field(name: str, value: str) -> Field:
    if not value.isascii():
        value = email.header.Header(value, "utf-8", header_name=name).encode()
    return name.lower(), f"{name}: {value}".encode("ascii") + CRLF


def _b64_body(pem: bytes) -> memoryview:
    """A PEM block's base64 lines (64 characters, as RFC 2045 allows) with CRLF line ends.

    cryptography writes PEM in Rust: for a 200 KiB message that is 0.45 ms less than DER
    wrapped into lines by Python (whose per-line slicing cost as much as the encryption)."""
    lines = pem.replace(b"\n", CRLF)  # one copy; the view below is joined into the entity
    start = lines.index(b"\n") + 1  # after -----BEGIN PKCS7-----
    return memoryview(lines)[start:lines.rindex(b"-----END")]


def _with_protected_param(content_fields: list[Field]) -> list[Field]:
    """Mark the entity's Content-Type with protected-headers="v1" (RFC 9788 readers look)."""
    out: list[Field] = []
    seen_type = False
    for name, raw in content_fields:
        if name == "content-type":
            seen_type = True
            if b"protected-headers" not in raw.lower():
                raw = raw[:-2].rstrip() + b'; protected-headers="v1"' + CRLF
        out.append((name, raw))
    if not seen_type:
        out.insert(0, _field("Content-Type", 'text/plain; charset="us-ascii"; protected-headers="v1"'))
    return out


def _needs_encoding(data: bytes) -> bool:
    return not data.isascii() or not lines_within(data, _MAX_LINE + 1)


def lines_within(data: bytes, limit: int) -> bool:
    """True when no line (up to a LF) of ``data`` is longer than ``limit`` bytes.

    Splitting a 200 KB body into its 2,700 lines to measure them cost 0.15 ms. A line longer
    than ``limit`` holds a whole aligned block of ``(limit + 2) // 2`` bytes, so if every such
    block has a LF, no line is too long; only a block without one needs the exact count."""
    step = (limit + 2) // 2
    find = data.find
    for pos in range(0, len(data) - step + 1, step):
        if find(b"\n", pos, pos + step) < 0:
            return max(map(len, data.split(b"\n"))) <= limit
    return True


def _seven_bit(raw: bytes) -> bytes:
    """Re-encode 8-bit or over-long bodies (QP/base64) so no relay can alter signed bytes."""
    _fields, body = split_message(raw)
    if not _needs_encoding(body):
        return raw
    msg = BytesParser(policy=email.policy.default).parsebytes(raw)
    for part in msg.walk():
        if part.is_multipart():
            continue
        cte = str(part.get("Content-Transfer-Encoding", "7bit")).strip().lower()
        payload = part.get_payload(decode=False)
        if cte in ("base64", "quoted-printable") and isinstance(payload, str) and payload.isascii():
            continue
        data = part.get_payload(decode=True) or b""
        if cte not in ("base64", "quoted-printable") and not _needs_encoding(data):
            continue
        del part["Content-Transfer-Encoding"]
        if part.get_content_maintype() == "text":
            part.set_payload(quopri.encodestring(data).decode("ascii"))
            part["Content-Transfer-Encoding"] = "quoted-printable"
        else:
            part.set_payload(data)
            email.encoders.encode_base64(part)
    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=email.policy.SMTP).flatten(msg)
    return to_crlf(out.getvalue())


def _boundary(avoid: bytes) -> str:
    while True:
        candidate = f"------------ms{secrets.token_hex(12)}"
        if candidate.encode() not in avoid:
            return candidate


# --- the two cryptographic steps ----------------------------------------------------------


def _sign_entity(
    entity: bytes, key: rsa.RSAPrivateKey, cert: x509.Certificate,
    chain: Sequence[x509.Certificate],
) -> bytes:
    """multipart/signed around `entity` (CRLF canonical), detached SHA-256 CMS signature."""
    builder = pkcs7.PKCS7SignatureBuilder().set_data(entity).add_signer(cert, key, hashes.SHA256())
    for extra in chain:
        builder = builder.add_certificate(extra)
    try:
        pem = builder.sign(serialization.Encoding.PEM, _SIGNED_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise CryptoError(f"S/MIME signing failed: {exc}") from exc
    boundary = _boundary(entity)
    b = boundary.encode()
    return b"".join([
        b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; '
        b'micalg=sha-256;\r\n boundary="', b, b'"\r\n\r\n',
        b"This is a cryptographically signed message in MIME format.\r\n\r\n",
        b"--", b, CRLF, entity, CRLF,
        b"--", b, CRLF,
        b'Content-Type: application/pkcs7-signature; name="smime.p7s"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="smime.p7s"\r\n'
        b"Content-Description: S/MIME Cryptographic Signature\r\n\r\n",
        _b64_body(pem), CRLF,
        b"--", b, b"--", CRLF,
    ])


def _envelope(plaintext: bytes, recipients: Sequence[x509.Certificate],
              ) -> list[bytes | memoryview]:
    """application/pkcs7-mime enveloped-data entity (AES-256-CBC, RSA key transport), in
    pieces for the caller's one join (each ``+`` copied the 370 KB into a fresh buffer)."""
    if not recipients:
        raise CryptoError("no S/MIME recipient certificate to encrypt to")
    builder = pkcs7.PKCS7EnvelopeBuilder().set_data(plaintext)
    try:
        for cert in recipients:
            builder = builder.add_recipient(cert)
        builder = builder.set_content_encryption_algorithm(algorithms.AES256)
        pem = builder.encrypt(serialization.Encoding.PEM, [pkcs7.PKCS7Options.Binary])
    except (ValueError, TypeError) as exc:
        raise CryptoError(
            f"S/MIME encryption failed: {exc}",
            hint="every recipient needs an RSA S/MIME certificate",
        ) from exc
    return [
        b'Content-Type: application/pkcs7-mime; smime-type=enveloped-data;\r\n name="smime.p7m"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="smime.p7m"\r\n'
        b"Content-Description: S/MIME Encrypted Message\r\n\r\n", _b64_body(pem),
    ]


def _entity_and_outer(raw: bytes) -> tuple[bytes, list[Field]]:
    """The inner entity (protected + content headers, body) and the message's other fields."""
    fields, body = split_message(_seven_bit(to_crlf(raw)))
    content = [f for f in fields if _is_content(f[0])]
    others = [f for f in fields if not _is_content(f[0]) and f[0] not in DROP]
    protected = [f for f in others if f[0] != "mime-version"]
    head = b"".join(raw_f for _, raw_f in protected + _with_protected_param(content))
    return head + CRLF + body, others


def _sign_encrypt(
    raw: bytes, key: rsa.RSAPrivateKey, cert: x509.Certificate,
    chain: Sequence[x509.Certificate], recipients: Sequence[x509.Certificate],
    protected_subject: str,
) -> bytes:
    entity, others = _entity_and_outer(raw)
    enveloped = _envelope(_sign_entity(entity, key, cert, chain), recipients)
    outer = [f for f in others if f[0] in OUTER_KEEP]
    outer.append(_field("Subject", protected_subject))
    outer.append(_field("MIME-Version", "1.0"))
    log.debug("S/MIME signed and encrypted to %d certificate(s)", len(recipients))
    return b"".join([*(raw_f for _, raw_f in outer), *enveloped])


def _sign_only(
    raw: bytes, key: rsa.RSAPrivateKey, cert: x509.Certificate, chain: Sequence[x509.Certificate]
) -> bytes:
    entity, others = _entity_and_outer(raw)
    signed = _sign_entity(entity, key, cert, chain)
    outer = [f for f in others if f[0] != "mime-version"]
    outer.append(_field("MIME-Version", "1.0"))
    return b"".join(raw_f for _, raw_f in outer) + signed


# --- public API ---------------------------------------------------------------------------


def _as_bytes(msg: EmailMessage) -> bytes:
    return msg.as_bytes(policy=email.policy.SMTP)


def parse_lf(raw: bytes) -> EmailMessage:
    """Parse wire bytes the way the email package prefers them: LF line ends inside."""
    msg = BytesParser(policy=email.policy.default).parsebytes(raw.replace(CRLF, b"\n"))
    return msg  # type: ignore[return-value]


def sign_encrypt(
    msg: EmailMessage, *, signer: Identity, recipients: list[x509.Certificate],
    protected_subject: str = PROTECTED_SUBJECT,
) -> EmailMessage:
    """Sign with the hub's identity, then encrypt to every recipient certificate."""
    raw = _sign_encrypt(
        _as_bytes(msg), signer.key, signer.cert, signer.chain, recipients, protected_subject
    )
    return parse_lf(raw)


def sign_only(msg: EmailMessage, signer: Identity) -> EmailMessage:
    """multipart/signed for recipients a rule allows plaintext (still signed by the hub)."""
    return parse_lf(_sign_only(_as_bytes(msg), signer.key, signer.cert, signer.chain))


@functools.lru_cache(maxsize=16)
def _identity(key_pem: bytes, cert_pem: bytes) -> Identity:
    return load_identity(key_pem, cert_pem)


@functools.lru_cache(maxsize=1024)
def _cert(pem: bytes) -> x509.Certificate:
    return load_certs(pem)[0]


def sign_encrypt_bytes(
    raw: bytes, signer_key_pem: bytes, signer_cert_pem: bytes, recipient_cert_pems: list[bytes],
    protected_subject: str = PROTECTED_SUBJECT,
) -> bytes:
    """sign_encrypt for a worker process: PEM in, wire bytes (CRLF) out; keys cached."""
    ident = _identity(signer_key_pem, signer_cert_pem)
    certs = [_cert(p) for p in recipient_cert_pems]
    return _sign_encrypt(raw, ident.key, ident.cert, ident.chain, certs, protected_subject)


def sign_only_bytes(raw: bytes, signer_key_pem: bytes, signer_cert_pem: bytes) -> bytes:
    """sign_only for a worker process: PEM in, wire bytes (CRLF) out."""
    ident = _identity(signer_key_pem, signer_cert_pem)
    return _sign_only(raw, ident.key, ident.cert, ident.chain)
