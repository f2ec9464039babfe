"""RFC 5322 Message-ID handling: one canonical form so that ids written differently compare equal.

Threading (see the "Threading" paragraph of the product brief) compares Message-IDs taken from
Message-ID, In-Reply-To and References headers written by many clients. RFC 5322 says two ids
are the same when they denote the same ``id-left@id-right``; clients differ in quoting, comments
and folding. ``normalize_msgid`` produces the form used for every comparison and every stored
key:

- angle brackets kept: ``<left@right>``;
- comments, folding and other whitespace outside quoted strings removed (also the obsolete
  CFWS allowed around ``.`` and ``@``);
- a quoted local part is unquoted, its quoted-pairs resolved, and written bare when the result
  is a valid dot-atom (``<"abc"@x>`` == ``<abc@x>``), else re-quoted with only ``"`` and ``\\``
  escaped (``<"a b"@x>`` stays quoted);
- case is kept on both sides (``<Case@x>`` != ``<case@x>``): RFC 5322 gives no case rule for
  ids and the conformance corpus checks that they compare case-sensitively.

Ids that are bracketed but not RFC-valid (``<a@b@c>``, ``<a..b@c>``) are kept verbatim when
they carry an ``@`` and no whitespace, since real mailers emit them and replies repeat them
byte for byte. Ids without ``@`` (``<12345>``) are refused: they collide too easily to be used
to join a case.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterable

from mailhub.errors import ConfigError

MAX_REFERENCES = 100
"""At most this many ids are kept from one References list: the LAST ones (nearest ancestors)."""

MAX_MSGID_CHARS = 998
"""An id longer than an RFC 5322 line is not an id but an attack on the parser."""

_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\u0080-\U0010ffff"
_DOT_ATOM = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_ATOM_CHARS = re.compile(rf"[{_ATEXT}]+")
_LINEBREAKS = re.compile(r"\r\n|\r|\n")
_CANONICAL = re.compile(rf"<[{_ATEXT}]+(?:\.[{_ATEXT}]+)*@[{_ATEXT}]+(?:\.[{_ATEXT}]+)*>")
"""Already canonical (the common case for stored ids): returned as is, without parsing."""
_LENIENT_BODY = re.compile(r"[^\s<>]+")
_DOMAIN_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


class _Parser:
    """A tiny cursor over one candidate id; every method returns None instead of raising."""

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def at_end(self) -> bool:
        return self.i >= len(self.s)

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def skip_cfws(self) -> bool:
        """Skip whitespace and (nested) comments; False when a comment is not closed."""
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in " \t":
                self.i += 1
            elif c == "(":
                end = comment_end(self.s, self.i)
                if end is None:
                    return False
                self.i = end
            else:
                break
        return True

    def quoted_string(self) -> str | None:
        """The value of a quoted string at the cursor, quoted-pairs resolved."""
        out: list[str] = []
        i = self.i + 1
        while i < len(self.s):
            c = self.s[i]
            if c == "\\" and i + 1 < len(self.s):
                out.append(self.s[i + 1])
                i += 2
            elif c == '"':
                self.i = i + 1
                return "".join(out)
            else:
                out.append(c)
                i += 1
        return None

    def word(self) -> tuple[str, bool] | None:
        """An atom or quoted string (with surrounding CFWS): (value, was_quoted)."""
        if not self.skip_cfws():
            return None
        if self.peek() == '"':
            value = self.quoted_string()
            if value is None:
                return None
            result = (value, True)
        else:
            m = _ATOM_CHARS.match(self.s, self.i)
            if not m:
                return None
            self.i = m.end()
            result = (m.group(0), False)
        if not self.skip_cfws():
            return None
        return result

    def local_part(self) -> str | None:
        """``word *("." word)``, rendered canonically (bare when it is a dot-atom)."""
        parts: list[str] = []
        while True:
            w = self.word()
            if w is None:
                return None
            parts.append(w[0])
            if self.peek() != ".":
                break
            self.i += 1
        value = ".".join(parts)
        if _DOT_ATOM.fullmatch(value):
            return value
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'

    def domain(self) -> str | None:
        """A dot-atom (CFWS allowed around the dots) or a domain literal."""
        if not self.skip_cfws():
            return None
        if self.peek() == "[":
            out: list[str] = []
            i = self.i + 1
            while i < len(self.s):
                c = self.s[i]
                if c == "\\" and i + 1 < len(self.s):
                    out.append(self.s[i + 1])
                    i += 2
                elif c == "]":
                    self.i = i + 1
                    body = "".join(out)
                    if not body or "[" in body:
                        return None
                    return "[" + body + "]"
                elif c in " \t":
                    i += 1
                else:
                    out.append(c)
                    i += 1
            return None
        atoms: list[str] = []
        while True:
            if not self.skip_cfws():
                return None
            m = _ATOM_CHARS.match(self.s, self.i)
            if not m:
                return None
            atoms.append(m.group(0))
            self.i = m.end()
            if not self.skip_cfws():
                return None
            if self.peek() != ".":
                break
            self.i += 1
        return ".".join(atoms)

    def addr_spec(self) -> str | None:
        local = self.local_part()
        if local is None or self.peek() != "@":
            return None
        self.i += 1
        domain = self.domain()
        if domain is None:
            return None
        return f"{local}@{domain}"


def comment_end(s: str, start: int) -> int | None:
    """Index just past the comment opened at ``start`` (nesting, quoted-pairs); None if open."""
    depth = 0
    i = start
    while i < len(s):
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _strict(text: str) -> str | None:
    """``[CFWS] "<" addr-spec ">" [CFWS]`` or a bare ``[CFWS] addr-spec [CFWS]``."""
    p = _Parser(text)
    if not p.skip_cfws():
        return None
    bracketed = p.peek() == "<"
    if bracketed:
        p.i += 1
    spec = p.addr_spec()
    if spec is None:
        return None
    if bracketed:
        if p.peek() != ">":
            return None
        p.i += 1
    if not p.skip_cfws() or not p.at_end():
        return None
    return f"<{spec}>"


def _lenient(text: str) -> str | None:
    """A bracketed id that is not RFC-valid but plainly an id: kept byte for byte."""
    stripped = text.strip(" \t")
    if not (stripped.startswith("<") and stripped.endswith(">")):
        return None
    body = stripped[1:-1]
    if not _LENIENT_BODY.fullmatch(body):
        return None
    left, sep, right = body.rpartition("@")
    if not sep or not left or not right:
        return None
    return f"<{body}>"


def normalize_msgid(value: str | None) -> str | None:
    """The canonical ``<left@right>`` form of one Message-ID, or None if it is not one.

    A bare ``left@right`` (no brackets) is accepted only when it is RFC-valid, and gets brackets.
    """
    if not isinstance(value, str):
        return None
    if len(value) <= MAX_MSGID_CHARS and _CANONICAL.fullmatch(value):
        return value
    text = _LINEBREAKS.sub("", value)
    if len(text) > MAX_MSGID_CHARS * 2:
        return None
    result = _strict(text) or _lenient(text)
    if result is None or len(result) > MAX_MSGID_CHARS:
        return None
    return result


def _bracket_end(s: str, start: int) -> int | None:
    """Index of the ``>`` closing the ``<`` at ``start``, honouring quoted strings.

    Gives up (None) at another unquoted ``<`` or after MAX_MSGID_CHARS characters, so a hostile
    header full of unclosed brackets costs linear time.
    """
    quoted = False
    i = start + 1
    limit = min(len(s), start + MAX_MSGID_CHARS + 2)
    while i < limit:
        c = s[i]
        if quoted:
            if c == "\\":
                i += 2
                continue
            if c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == ">":
            return i
        elif c == "<":
            return None
        i += 1
    return None


def dedupe_and_cap(ids: Iterable[str], cap: int = MAX_REFERENCES) -> list[str]:
    """Drop repeats (first occurrence kept), then keep the last ``cap`` ids.

    The last entries of References are the nearest ancestors, the ones that find the case; a
    5,000-entry list (or a loop repeating ids) costs the store at most ``cap`` look-ups.
    """
    seen: set[str] = set()
    out: list[str] = []
    for item in ids:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out[-cap:] if cap > 0 else []


def parse_msgid_list(header_value: str | None, cap: int = MAX_REFERENCES) -> list[str]:
    """Normalized ids from a References or In-Reply-To value, tolerant of what clients write.

    - garbage between ids (phrases, commas, stray quotes, comments) is skipped;
    - a ``<`` that is never closed is skipped and scanning goes on after it;
    - bare ``left@right`` tokens (no brackets) are used only when no bracketed id parses at
      all (old clients wrote In-Reply-To that way; otherwise such a token is more likely an
      e-mail address in a phrase like ``your message of ... from a@b``);
    - duplicates are removed keeping the first occurrence, so loops end;
    - at most the LAST ``cap`` (default 100) ids are returned (see ``dedupe_and_cap``).
    """
    if not isinstance(header_value, str) or not header_value:
        return []
    if len(header_value) <= MAX_MSGID_CHARS and _CANONICAL.fullmatch(header_value):
        return [header_value]
    s = _LINEBREAKS.sub("", header_value)
    found: list[str] = []
    comments_ok = True
    i = 0
    n = len(s)
    while i < n:
        c = s[i]
        if c == "(" and comments_ok:
            end = comment_end(s, i)
            if end is None:
                comments_ok = False  # an unclosed comment: treat '(' as garbage from here on
                i += 1
            else:
                i = end
        elif c == "<":
            end = _bracket_end(s, i)
            if end is None:
                i += 1
                continue
            norm = normalize_msgid(s[i : end + 1])
            if norm is not None:
                found.append(norm)
            i = end + 1
        else:
            i += 1
    if not found:
        for token in re.split(r"[\s,;<>()\"]+", s):
            if "@" in token:
                norm = _strict(token)
                if norm is not None:
                    found.append(norm)
    return dedupe_and_cap(found, cap)


def make_msgid(domain: str) -> str:
    """A new globally unique Message-ID at ``domain`` (time-ordered prefix, 128 random bits)."""
    host = (domain or "").strip().rstrip(".")
    try:
        ascii_host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError as exc:
        raise ConfigError(
            f"hub domain {domain!r} is not a valid domain name",
            hint="set [hub].domain in config.toml to the organisation's mail domain",
        ) from exc
    labels = ascii_host.split(".")
    if (
        not ascii_host
        or len(ascii_host) > 253
        or not all(_DOMAIN_LABEL.fullmatch(x) for x in labels)
    ):
        raise ConfigError(
            f"hub domain {domain!r} is not a valid domain name",
            hint="set [hub].domain in config.toml to the organisation's mail domain",
        )
    stamp = format(time.time_ns() // 1_000_000, "x")
    return f"<{stamp}.{secrets.token_hex(16)}@{ascii_host.lower()}>"
