"""Case ids in Subjects, reply/forward prefixes, and the RFC 5256 base subject.

The hub writes ``[MT-2026-0042]`` into the (protected) Subject of case mail; replies carry it
back. People also type it by hand, so ``find_case_tag`` accepts what a person plausibly types:

- any case and spacing inside the brackets: ``[ mt-2026-0042 ]``;
- extra words AFTER the id: ``[MT-2026-0042 follow up]`` (the id must be the FIRST token inside
  the brackets, followed by whitespace or ``]``; ``[follow up MT-2026-0042]`` is not a tag; the
  words after it are at most 200 characters and contain no bracket);
- full-width brackets ``［…］`` / ``【…】`` (CJK input methods) and typographic hyphens;
- more than four digits, with extra leading zeros dropped down to four (``MT-2026-00042`` is
  ``MT-2026-0042``), which is how ids are written by ``format_case_id``.

The canonical id is upper-case ``MT-<year>-<number, at least 4 digits>``. Subject text alone
never joins a case; only an id does (and only when that case exists, see threading.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

CASE_ID_PREFIX = "MT"

_HYPHEN = "[-\u2010\u2011\u2012\u2013\u2212\uff0d]"
_ID_CORE = rf"({CASE_ID_PREFIX})\s{{0,3}}{_HYPHEN}\s{{0,3}}([0-9]{{4}})\s{{0,3}}{_HYPHEN}\s{{0,3}}([0-9]{{4,12}})"

CASE_TAG = re.compile(
    rf"[\[\uff3b\u3010]\s{{0,20}}{_ID_CORE}(?:\s[^\[\]\uff3b\uff3d\u3010\u3011]{{0,200}})?[\]\uff3d\u3011]",
    re.IGNORECASE,
)
"""A case tag in a Subject: the id first inside the brackets, optional words after it."""

CASE_ID = re.compile(rf"\s*{_ID_CORE}\s*", re.IGNORECASE)
"""A bare case id (CLI arguments, ``case+ID@`` addresses), same tolerance as the tag."""

REPLY_PREFIXES: tuple[str, ...] = (
    "re", "fw", "fwd", "aw", "wg", "sv", "vs", "rif", "rv", "antw", "tr", "odp",
    "ynt", "ilt", "İlt", "res", "enc", "réf", "ref",
    "回复", "答复", "回覆", "转发", "轉寄", "رد", "توجيه", "ΑΠ", "ΣΧΕΤ", "ΠΡΘ",
)  # fmt: skip
"""Reply/forward leaders clinics and patients' clients write: English, German (AW, WG),
Nordic (SV, VS), Italian (Rif), Spanish (RV), Dutch (Antw), French (TR, Réf), Polish (Odp),
Turkish (Ynt, İlt), Portuguese (RES, ENC), Chinese, Arabic, Greek."""

_COUNTER = r"(?:\s?\[\d{1,4}\]|\s?\(\d{1,4}\)|\^\d{1,4}|\d{1,4})?"


def format_case_id(year: int, number: int) -> str:
    """The canonical id for the ``number``-th case of ``year``: ``MT-2026-0042``."""
    return f"{CASE_ID_PREFIX}-{year:04d}-{number:04d}"


def _canonical(m: re.Match[str]) -> str:
    return f"{CASE_ID_PREFIX}-{m.group(2)}-{int(m.group(3)):04d}"


def canonical_case_id(value: str | None) -> str | None:
    """``value`` as a canonical case id if it is exactly one (spacing/case tolerated), else None."""
    if not isinstance(value, str):
        return None
    m = CASE_ID.fullmatch(value)
    return _canonical(m) if m else None


def find_case_tags(subject: str | None) -> list[str]:
    """Every case tag in ``subject``, canonical, in order of appearance, without repeats."""
    if not isinstance(subject, str):
        return []
    out: list[str] = []
    for m in CASE_TAG.finditer(subject):
        cid = _canonical(m)
        if cid not in out:
            out.append(cid)
    return out


def find_case_tag(subject: str | None) -> str | None:
    """The first case tag in ``subject`` as a canonical upper-case id, or None."""
    tags = find_case_tags(subject)
    return tags[0] if tags else None


@lru_cache(maxsize=32)
def _leaders(prefixes: tuple[str, ...]) -> re.Pattern[str]:
    alts = "|".join(re.escape(p) for p in sorted(prefixes, key=len, reverse=True))
    one = rf"\s*(?:{alts}){_COUNTER}\s?[:：]"
    return re.compile(rf"(?:{one})+\s*", re.IGNORECASE)


def strip_reply_prefixes(subject: str | None, prefixes: Sequence[str] = REPLY_PREFIXES) -> str:
    """``subject`` without its leading reply/forward prefixes (``Re: AW: Fwd[2]: 回复：``).

    For display only: threading never uses subject text. Counters (``Re[2]:``, ``Re(3):``,
    ``Re^2:``) and the full-width colon are handled; prefixes further in are left alone.
    """
    if not isinstance(subject, str):
        return ""
    m = _leaders(tuple(prefixes)).match(subject)
    rest = subject[m.end() :] if m else subject
    return rest.strip()


def add_case_tag(subject: str | None, case_id: str) -> str:
    """``subject`` carrying ``[case_id]``: unchanged if it already has that tag (idempotent),
    else the tag goes after any reply prefixes (``Re: [MT-2026-0042] Pre-op``)."""
    cid = canonical_case_id(case_id)
    if cid is None:
        raise ValueError(f"not a case id: {case_id!r}")
    text = " ".join((subject or "").split())
    if cid in find_case_tags(text):
        return text
    m = _leaders(REPLY_PREFIXES).match(text)
    head = text[: m.end()].strip() if m else ""
    rest = text[m.end() :] if m else text
    tagged = f"[{cid}] {rest}".rstrip()
    return f"{head} {tagged}" if head else tagged


_FWD_TRAILER = re.compile(r"\s*\(fwd\)\s*$", re.IGNORECASE)
_BLOB = re.compile(r"\[[^\[\]]*\]\s*")


def _strip_blobs(text: str) -> str:
    """Leading ``[blob]``s (list tags, case tags) when something is left after them."""
    i = 0
    while True:
        m = _BLOB.match(text, i)
        if not m or not text[m.end() :].strip():
            return text[i:]
        i = m.end()


def base_subject(subject: str | None, prefixes: Sequence[str] = REPLY_PREFIXES) -> str:
    """The RFC 5256 base subject (section 2.1), case-folded, for subject-fallback grouping.

    Whitespace collapsed, ``(fwd)`` trailers, reply/forward leaders (``prefixes``, with
    counters), leading blobs (kept when nothing else would remain) and ``[fwd: ...]`` wrappers
    removed, repeatedly.
    """
    text = " ".join((subject or "").split())
    leaders = _leaders(tuple(prefixes))
    while True:
        before = text
        text = _FWD_TRAILER.sub("", text)
        m = leaders.match(text)
        if m:
            text = text[m.end() :]
        text = _strip_blobs(text).strip()
        lower = text.lower()
        if lower.startswith("[fwd:") and text.endswith("]"):
            text = text[5:-1].strip()
        if text == before:
            return text.casefold()
