"""Message-ID canonical form and list parsing: the comparisons threading relies on."""

from __future__ import annotations

import re

import pytest

from mailhub.errors import ConfigError
from mailhub.parse.msgid import (
    MAX_REFERENCES,
    dedupe_and_cap,
    make_msgid,
    normalize_msgid,
    parse_msgid_list,
)


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("<abc@x.example>", "<abc@x.example>"),
        ('<"abc"@x.example>', "<abc@x.example>"),
        ('<"01KF8JCEOCBS0045PS"@xxx.yyy.com>', "<01KF8JCEOCBS0045PS@xxx.yyy.com>"),
        ('<"a\\bc"@x>', "<abc@x>"),  # a quoted-pair of an ordinary character is that character
        ('<"a".b@x>', "<a.b@x>"),  # obsolete local part made of words
        ('<"a.b"@x>', "<a.b@x>"),
        ('<"a b"@x>', '<"a b"@x>'),  # not a dot-atom once unquoted: stays quoted
        ('<"a\\"b"@x>', '<"a\\"b"@x>'),
        ('<"a..b"@x>', '<"a..b"@x>'),
        ("  (comment) <abc (inner) @ x.example> (tail)", "<abc@x.example>"),
        ("<abc@\r\n x.example>", "<abc@x.example>"),  # folding whitespace
        ("<abc@[192.0.2.1]>", "<abc@[192.0.2.1]>"),
        ("<ünï@x.example>", "<ünï@x.example>"),  # RFC 6532 UTF-8 atext
        ("abc@x.example", "<abc@x.example>"),  # bare but valid: brackets added
        ("<a@b@c>", "<a@b@c>"),  # not RFC-valid but plainly an id: kept verbatim
    ],
)
def test_normalize_canonical_forms(raw: str, canonical: str) -> None:
    assert normalize_msgid(raw) == canonical


def test_quoted_and_unquoted_forms_compare_equal() -> None:
    assert normalize_msgid('<"abc"@x>') == normalize_msgid("<abc@x>")
    assert normalize_msgid('<"a b"@x>') != normalize_msgid("<ab@x>")


def test_case_is_kept_on_both_sides() -> None:
    assert normalize_msgid("<Case@Example.COM>") == "<Case@Example.COM>"
    assert normalize_msgid("<Case@x>") != normalize_msgid("<case@x>")
    assert normalize_msgid("<a@X>") != normalize_msgid("<a@x>")


@pytest.mark.parametrize(
    "raw",
    [None, "", "   ", "not-a-message-id", "<12345>", "<@x>", "<a@>", "<a b@x>", "<a@x", 42],
)
def test_not_an_id(raw: object) -> None:
    assert normalize_msgid(raw) is None  # type: ignore[arg-type]


def test_huge_id_is_refused() -> None:
    assert normalize_msgid("<" + "a" * 5000 + "@x>") is None


def test_list_tolerates_garbage_comments_and_unclosed_brackets() -> None:
    header = 'Your message of Monday <a@x> "quoted <junk" , <"c"@d>(<hidden@e>) <unclosed <g@h>'
    assert parse_msgid_list(header) == ["<a@x>", "<c@d>", "<g@h>"]


def test_list_unclosed_comment_does_not_swallow_ids() -> None:
    assert parse_msgid_list("(no end <a@x> <b@y>") == ["<a@x>", "<b@y>"]


def test_bare_ids_only_when_nothing_bracketed_parses() -> None:
    assert parse_msgid_list("foo@bar.example") == ["<foo@bar.example>"]
    assert parse_msgid_list("see coordinator@hub.example <real@x>") == ["<real@x>"]
    assert parse_msgid_list("not-a-message-id") == []


def test_list_removes_duplicates_keeping_first_occurrence_and_survives_loops() -> None:
    assert parse_msgid_list("<a@x> <b@x> <a@x> <c@x> <b@x>") == ["<a@x>", "<b@x>", "<c@x>"]


def test_list_keeps_the_last_hundred_of_five_thousand() -> None:
    header = "\r\n ".join(f"<ref{i}@x.example>" for i in range(5000))
    ids = parse_msgid_list(header)
    assert len(ids) == MAX_REFERENCES
    assert ids[0] == "<ref4900@x.example>"
    assert ids[-1] == "<ref4999@x.example>"


def test_hostile_list_is_linear_enough() -> None:
    # 200k characters of unclosed brackets, comments and quotes must not blow up
    header = ('<"' * 20000) + ("(" * 20000) + "<ok@x>" + ("<" * 20000)
    assert parse_msgid_list(header) == ["<ok@x>"]


def test_dedupe_and_cap() -> None:
    assert dedupe_and_cap(["a", "b", "a", "c"], cap=2) == ["b", "c"]
    assert dedupe_and_cap(["a"], cap=0) == []


def test_make_msgid_is_unique_valid_and_at_the_domain() -> None:
    ids = {make_msgid("MedVoyage.example") for _ in range(200)}
    assert len(ids) == 200
    for mid in ids:
        assert re.fullmatch(r"<[0-9a-f]+\.[0-9a-f]{32}@medvoyage\.example>", mid)
        assert normalize_msgid(mid) == mid


@pytest.mark.parametrize("domain", ["", "bad domain", "-x.example", "a..b"])
def test_make_msgid_refuses_a_bad_domain(domain: str) -> None:
    with pytest.raises(ConfigError, match="not a valid domain"):
        make_msgid(domain)
