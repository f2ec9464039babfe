"""Inbound OpenPGP: open whatever PGP a message carries and say how well it was protected.

Handles PGP/MIME encrypted (signed inside or not, and RFC 3156 §6.1 encrypted multipart/signed),
PGP/MIME signed (verified over the raw bytes between the boundaries, CRLF-canonical), inline PGP
in a text/plain body (encrypted blocks and clearsigned text), encrypted attachments (armored,
or binary .pgp/.gpg/.asc) and detached ``name.sig`` signatures of a sibling attachment.

The verdict is for the whole message, decided by a small pure function over every content part
(``aggregate``): "openpgp" only when every part with content was encrypted, "verified" only when
every part was signed by the same good key. Plaintext around an inline block or a list footer
beside an encrypted part makes the message unprotected: fail closed.

Pass raw bytes when you have them (a multipart/signed signature covers bytes, and re-serialising
a parsed message may not reproduce them). Bad input raises ``DecryptionFailed``; ciphertext is
never returned as if it were plaintext.
"""

from __future__ import annotations

import io
import logging
import mimetypes
import re
from dataclasses import dataclass
from email import policy
from email.generator import BytesGenerator
from email.message import EmailMessage, Message
from email.parser import BytesParser
from typing import NamedTuple

from mailhub.crypto.mime_split import canonical, light_entity, split_parts
from mailhub.crypto.openpgp_ops import MAX_OUTPUT, DecryptOutcome, decrypt, verify_detached
from mailhub.crypto.protection import strip_protection_headers
from mailhub.errors import DecryptionFailed, MailhubError

log = logging.getLogger("mailhub.crypto")

MAX_DEPTH = 24
_RANK = {"none": 0, "verified": 1, "unknown-key": 2, "invalid": 3}
_INNER_WINS = ("subject",)
_INNER_FILLS = ("from", "to", "cc", "reply-to", "date", "message-id", "in-reply-to", "references")
_ARMOR_BEGIN = re.compile(rb"^-----BEGIN PGP (MESSAGE|SIGNED MESSAGE)-----[ \t]*\r?$", re.M)
_ARMOR_END = {b"MESSAGE": re.compile(rb"^-----END PGP MESSAGE-----[ \t]*\r?$", re.M),
              b"SIGNED MESSAGE": re.compile(rb"^-----END PGP SIGNATURE-----[ \t]*\r?$", re.M)}
_CHARSET_HDR = re.compile(rb"^Charset:[ \t]*([A-Za-z0-9._:-]+)[ \t]*\r?$", re.M)
_PGP_SUFFIXES = (".pgp", ".gpg", ".asc")


@dataclass
class Unwrapped:
    message: EmailMessage
    encryption: str  # "openpgp" | "none"
    signature: str  # "verified" | "invalid" | "unknown-key" | "none"
    signer: str | None  # primary key fingerprint when a signature is known
    was_pgp: bool


class Seg(NamedTuple):
    """How one content part reached us."""

    encrypted: bool
    signature: str
    signer: str | None


PLAIN = Seg(False, "none", None)


def combine(a: Seg, signature: str, signer: str | None, *, encrypted: bool = False) -> Seg:
    """A part inside a signed/encrypted layer: the weaker of its own and the layer's signature."""
    sig, who = (signature, signer) if _RANK[signature] > _RANK[a.signature] else (a.signature,
                                                                                    a.signer)
    return Seg(a.encrypted or encrypted, sig, who)


def aggregate(segs: list[Seg]) -> tuple[str, str, str | None]:
    """(encryption, signature, signer) for the whole message, failing closed on mixtures."""
    if not segs:
        return "none", "none", None
    encryption = "openpgp" if all(s.encrypted for s in segs) else "none"
    invalid = next((s for s in segs if s.signature == "invalid"), None)
    if invalid:
        return encryption, "invalid", invalid.signer
    if any(s.signature == "none" for s in segs):
        return encryption, "none", None
    if any(s.signature == "unknown-key" for s in segs):
        return encryption, "unknown-key", None
    signers = {s.signer for s in segs}
    if len(signers) == 1 and None not in signers:
        return encryption, "verified", signers.pop()
    return encryption, "none", None  # different keys signed different parts: nobody vouches


class _Ctx:
    def __init__(self, gnupghome: str, passphrase: str | None) -> None:
        self.gnupghome = gnupghome
        self.passphrase = passphrase
        self.was_pgp = False
        self.budget = MAX_OUTPUT  # for the whole message: many small bombs are one big one

    def decrypt(self, data: bytes) -> DecryptOutcome:
        self.was_pgp = True
        out = decrypt(self.gnupghome, data, passphrase=self.passphrase, max_output=self.budget)
        self.budget -= len(out.plaintext)
        return out


def _parse(raw: bytes) -> EmailMessage:
    return BytesParser(policy=policy.default).parsebytes(raw)  # type: ignore[return-value]


def _flatten(part: Message) -> bytes:
    buf = io.BytesIO()
    BytesGenerator(buf, mangle_from_=False, policy=part.policy).flatten(part)
    return buf.getvalue()


def _decode(data: bytes, charset: str | None) -> str:
    for cs in (charset, "utf-8"):
        if cs:
            try:
                return data.decode(cs)
            except (LookupError, UnicodeDecodeError):
                continue
    return data.decode("latin-1")


def _process(part: Message, raw: bytes | None, ctx: _Ctx, depth: int) -> tuple[Message, list[Seg]]:
    """The part with its PGP opened, and one Seg per content part inside it."""
    if depth > MAX_DEPTH:
        raise DecryptionFailed("the message is nested too deeply to be read")
    ctype = part.get_content_type()
    if ctype == "multipart/encrypted":
        return _multipart_encrypted(part, ctx, depth)
    if ctype == "multipart/signed":
        if str(part.get_param("protocol", "")).lower() == "application/pgp-signature":
            return _multipart_signed(part, raw, ctx, depth)
        return part, [PLAIN]  # S/MIME or unknown: left untouched for its own layer
    if ctype == "message/rfc822" or not part.is_multipart():
        return _leaf(part, ctx) if ctype != "message/rfc822" else (part, [PLAIN])
    children = part.get_payload()
    raw_parts = None
    if raw is not None and any(c.is_multipart() for c in children):
        raw_parts = split_parts(raw, part.get_boundary() or "")
        if raw_parts is not None and len(raw_parts) != len(children):
            raw_parts = None
    new_children, child_segs = [], []
    for i, child in enumerate(children):
        new, segs = _process(child, raw_parts[i] if raw_parts else None, ctx, depth + 1)
        new_children.append(new)
        child_segs.append(segs)
    _detached_signatures(new_children, child_segs, ctx)
    part.set_payload(new_children)
    return part, [s for segs in child_segs for s in segs]


def _multipart_encrypted(part: Message, ctx: _Ctx, depth: int,
                         raw: bytes | None = None) -> tuple[Message, list[Seg]]:
    """Open PGP/MIME; with ``raw`` (the top level), ``part`` holds only the headers."""
    ctx.was_pgp = True
    protocol = str(part.get_param("protocol", "")).lower()
    if protocol != "application/pgp-encrypted":
        raise DecryptionFailed(f"multipart/encrypted with protocol {protocol or '(none)'!r} "
                               "is not OpenPGP and cannot be read")
    if raw is not None:
        children = [light_entity(p) for p in split_parts(raw, part.get_boundary() or "") or []]
    else:
        children = part.get_payload() if part.is_multipart() else []
    if len(children) < 2:
        raise DecryptionFailed("the multipart/encrypted message is missing its "
                               + ("encrypted part" if children else "parts"),
                               hint="the message was cut short or damaged on the way")
    control, body = children[0], children[1]
    if control.get_content_type() != "application/pgp-encrypted":
        raise DecryptionFailed("the first part of multipart/encrypted must be "
                               f"application/pgp-encrypted, not {control.get_content_type()}")
    if b"Version: 1" not in (control.get_payload(decode=True) or b""):
        raise DecryptionFailed("the PGP/MIME control part lacks 'Version: 1'")
    data = body.get_payload(decode=True) or b""
    if not data.strip():
        raise DecryptionFailed("the encrypted part of the message is empty")
    out = ctx.decrypt(data)
    if not out.encrypted:
        raise DecryptionFailed("multipart/encrypted content is not actually encrypted")
    new, segs = _process(_parse(out.plaintext), out.plaintext, ctx, depth + 1)
    segs = segs or [PLAIN]
    return new, [combine(s, out.signature, out.signer, encrypted=True) for s in segs]


def _multipart_signed(part: Message, raw: bytes | None, ctx: _Ctx,
                      depth: int) -> tuple[Message, list[Seg]]:
    ctx.was_pgp = True
    children = part.get_payload() if part.is_multipart() else []
    if not children:
        return part, [Seg(False, "invalid", None)]
    status, signer, content_raw = "invalid", None, None
    if len(children) == 2 and children[1].get_content_type() == "application/pgp-signature":
        raw_parts = split_parts(raw if raw is not None else _flatten(part),
                                part.get_boundary() or "")
        if raw_parts and len(raw_parts) == 2:
            content_raw = raw_parts[0]
            sig = children[1].get_payload(decode=True) or b""
            status, signer = verify_detached(ctx.gnupghome, canonical(content_raw), sig)
    content = children[0]
    if depth > 0:  # protected headers may sit on a nested signed layer
        for name, value in part.items():
            if not name.lower().startswith("content-") and name not in content:
                content[name] = value
    new, segs = _process(content, content_raw, ctx, depth + 1)
    return new, [combine(s, status, signer) for s in (segs or [PLAIN])]


def _is_pgp_encrypted(payload: bytes, filename: str) -> bool:
    """Armored PGP MESSAGE, or (for a PGP file name) a binary public/symmetric key packet."""
    if payload.lstrip().startswith(b"-----BEGIN PGP MESSAGE-----"):
        return True
    if not payload or not filename.endswith(_PGP_SUFFIXES) or not payload[0] & 0x80:
        return False
    first = payload[0]
    tag = first & 0x3F if first & 0x40 else (first >> 2) & 0x0F
    return tag in (1, 3)


def _leaf(part: Message, ctx: _Ctx) -> tuple[Message, list[Seg]]:
    ctype = part.get_content_type()
    filename = part.get_filename() or ""
    if _is_signature(part):
        # Content until _detached_signatures finds what it signs: a part that only calls itself
        # a signature ("note.sig" shown inline) must not slip past the verdict unsigned.
        return part, [PLAIN]
    payload = part.get_payload(decode=True) or b""
    attachment = bool(filename) or part.get_content_disposition() == "attachment"
    if ctype == "text/plain" and not attachment and _ARMOR_BEGIN.search(payload):
        return _inline_text(part, payload, ctx)
    if (attachment or ctype in ("application/pgp-encrypted", "application/octet-stream")) \
            and _is_pgp_encrypted(payload, filename.lower()):
        return _encrypted_attachment(part, payload, filename, ctx)
    if part.get_content_maintype() == "text" and not payload.strip():
        return part, []
    return part, [PLAIN]


def _encrypted_attachment(part: Message, payload: bytes, filename: str,
                          ctx: _Ctx) -> tuple[Message, list[Seg]]:
    out = ctx.decrypt(payload)
    name = filename
    for suffix in _PGP_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    guessed = mimetypes.guess_type(name)[0] if name else None
    maintype, _, subtype = (guessed or "application/octet-stream").partition("/")
    disposition = part.get_content_disposition() or "attachment"
    part.set_content(out.plaintext, maintype, subtype, disposition=disposition,
                     filename=name or None)
    return part, [Seg(out.encrypted, out.signature, out.signer)]


def _inline_text(part: Message, payload: bytes, ctx: _Ctx) -> tuple[Message, list[Seg]]:
    """Open each armored block of a text body in place; text around blocks is unprotected."""
    charset = part.get_content_charset()
    pieces: list[str] = []
    segs: list[Seg] = []
    outside = b""
    pos = 0
    for begin in _ARMOR_BEGIN.finditer(payload):
        if begin.start() < pos:
            continue  # inside a block already handled
        end = _ARMOR_END[begin.group(1)].search(payload, begin.end())
        if end is None:
            raise DecryptionFailed("the inline PGP block is truncated (no END line)",
                                   hint="ask the sender to send the message again")
        before = payload[pos:begin.start()]
        outside += before
        pieces.append(_decode(before, charset))
        block = payload[begin.start():end.end()]
        try:
            out = ctx.decrypt(block)
        except DecryptionFailed:
            if begin.group(1) == b"MESSAGE":
                raise
            # A clearsigned text whose signature cannot be read is still readable text.
            out = DecryptOutcome(block, "invalid", None, False)
        block_cs = _CHARSET_HDR.search(block) if begin.group(1) == b"MESSAGE" else None
        pieces.append(_decode(out.plaintext,
                              block_cs.group(1).decode("ascii") if block_cs else charset))
        segs.append(Seg(out.encrypted, out.signature, out.signer))
        pos = end.end()
    outside += payload[pos:]
    pieces.append(_decode(payload[pos:], charset))
    if outside.strip():
        segs.append(PLAIN)
    part.set_content("".join(pieces), subtype="plain", charset="utf-8")
    return part, segs


def _is_signature(part: Message) -> bool:
    return (part.get_content_type() == "application/pgp-signature"
            or (part.get_filename() or "").lower().endswith(".sig"))


def _detached_signatures(children: list[Message], segs: list[list[Seg]], ctx: _Ctx) -> None:
    """``name.sig`` (or a pgp-signature part named ``name.asc``) signs the sibling ``name``.

    A signature part that signs a sibling stops counting as content; any other stays content."""
    by_name = {c.get_filename(): i for i, c in enumerate(children) if c.get_filename()}
    for i, child in enumerate(children):
        fname = child.get_filename() or ""
        is_sig = fname.lower().endswith(".sig") or (
            child.get_content_type() == "application/pgp-signature"
            and fname.lower().endswith(".asc"))
        target = by_name.get(fname[:-4]) if is_sig and not child.is_multipart() else None
        if target is None:
            continue
        segs[i] = []
        data = children[target].get_payload(decode=True) or b""
        sig = child.get_payload(decode=True) or b""
        ctx.was_pgp = True
        status, signer = verify_detached(ctx.gnupghome, data, sig)
        if status == "invalid" and b"\r\n" in data:  # signed as a file with LF line ends
            status, signer = verify_detached(ctx.gnupghome, data.replace(b"\r\n", b"\n"), sig)
        segs[target] = [combine(s, status, signer) for s in segs[target]]


def _merge_headers(outer: Message, inner: Message) -> EmailMessage:
    """The opened content as the message: outer headers, inner Content-* and protected ones."""
    result = EmailMessage(policy=policy.default)
    for name, value in outer.items():
        lname = name.lower()
        if lname.startswith("content-") or lname == "mime-version":
            continue
        if lname in _INNER_WINS and inner.get(name) is not None:
            continue
        result[name] = value
    for name, value in inner.items():
        lname = name.lower()
        if lname.startswith("content-") or lname in _INNER_WINS or (
                lname in _INNER_FILLS and result.get(name) is None):
            result[name] = value
    result["MIME-Version"] = "1.0"
    result.set_payload(inner.get_payload())
    result.preamble, result.epilogue = inner.preamble, inner.epilogue
    return result


def unwrap(msg: Message | bytes, *, gnupghome: str, passphrase: str | None = None) -> Unwrapped:
    """Decrypt and verify ``msg``; the opened message comes back with the verdict."""
    try:
        raw = bytes(msg) if isinstance(msg, bytes | bytearray) else _flatten(msg)
        ctx = _Ctx(gnupghome, passphrase)
        root = light_entity(raw)
        if root.get_content_type() == "multipart/encrypted":  # the common case, kept cheap
            new_root, segs = _multipart_encrypted(root, ctx, 0, raw)
        else:
            root = _parse(raw)
            new_root, segs = _process(root, raw, ctx, 0)
        result = root if new_root is root else _merge_headers(root, new_root)
        strip_protection_headers(result)
        encryption, signature, signer = aggregate(segs)
        return Unwrapped(result, encryption, signature, signer, ctx.was_pgp)
    except MailhubError:
        raise
    except Exception as exc:  # malformed MIME must become a clear refusal, never a crash
        log.warning("unreadable inbound message structure: %s", type(exc).__name__,
                    exc_info=True)
        raise DecryptionFailed(f"cannot read this message's MIME structure "
                               f"({type(exc).__name__})") from exc
