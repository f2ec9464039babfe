"""Case tags in Subjects, reply prefixes for display, and the RFC 5256 base subject."""

from __future__ import annotations

import pytest

from mailhub.cases.subjects import (
    add_case_tag,
    base_subject,
    canonical_case_id,
    find_case_tag,
    find_case_tags,
    format_case_id,
    strip_reply_prefixes,
)


@pytest.mark.parametrize(
    ("subject", "case_id"),
    [
        ("[MT-2026-0042] Pre-op guide", "MT-2026-0042"),
        ("Re: [MT-2026-0042] Pre-op guide", "MT-2026-0042"),
        ("[ mt-2026-0042 ] typed by hand", "MT-2026-0042"),
        ("[MT-2026-0042 follow up] typed by hand", "MT-2026-0042"),
        ("question [Mt - 2026 - 0042]", "MT-2026-0042"),
        ("【MT–2026–0042】 回复", "MT-2026-0042"),  # CJK brackets, en dashes
        ("[MT-2026-00042]", "MT-2026-0042"),  # extra leading zero
        ("[MT-2026-12345] big year", "MT-2026-12345"),
    ],
)
def test_tags_people_write_are_found(subject: str, case_id: str) -> None:
    assert find_case_tag(subject) == case_id


@pytest.mark.parametrize(
    "subject",
    [
        "MT-2026-0042 without brackets",
        "[follow up MT-2026-0042]",  # the id must be the first token
        "[MT-2026-0042x]",
        "[MT-2026-042]",  # fewer than 4 digits
        "[MT-26-0042]",
        "[XY-2026-0042]",
        "[MT-2026-٠٠٤٢]",  # Arabic-Indic digits are not ASCII digits
        "Question about my surgery",
        "",
    ],
)
def test_things_that_are_not_tags(subject: str) -> None:
    assert find_case_tag(subject) is None


def test_several_tags_in_order_without_repeats() -> None:
    subject = "Re: [MT-2026-0001] Fwd: [MT-2025-0007] x [mt-2026-0001]"
    assert find_case_tags(subject) == ["MT-2026-0001", "MT-2025-0007"]


def test_ten_kilobyte_subject_of_near_tags_is_handled() -> None:
    subject = "[MT-2026-0042 " * 800 + "[MT-2026-0043]"
    assert len(subject) > 10_000
    assert find_case_tag(subject) == "MT-2026-0043"


def test_canonical_and_format() -> None:
    assert canonical_case_id(" mt-2026-0042 ") == "MT-2026-0042"
    assert canonical_case_id("MT-2026-0042 extra") is None
    assert canonical_case_id(None) is None
    assert format_case_id(2026, 42) == "MT-2026-0042"


@pytest.mark.parametrize(
    ("subject", "stripped"),
    [
        ("Re: Re: RE: Plan", "Plan"),
        ("Fwd: FW: Fw: Plan", "Plan"),
        ("AW: WG: SV: VS: Plan", "Plan"),
        ("Rif: RV: Antw: Plan", "Plan"),
        ("Re[2]: Re(3): RE^4: Plan", "Plan"),
        ("回复：答复: Plan", "Plan"),
        ("رد: Plan", "Plan"),
        ("Re : Plan", "Plan"),  # French typography
        ("Ynt: İlt: Plan", "Plan"),
        ("Re: [MT-2026-0042] Plan", "[MT-2026-0042] Plan"),
        ("Research: Plan", "Research: Plan"),  # a word starting like a prefix is not one
        ("Plan: Re: x", "Plan: Re: x"),  # only leading prefixes
    ],
)
def test_strip_reply_prefixes(subject: str, stripped: str) -> None:
    assert strip_reply_prefixes(subject) == stripped


def test_strip_reply_prefixes_on_many_repeats() -> None:
    assert strip_reply_prefixes("Re: " * 3000 + "Plan") == "Plan"


def test_add_case_tag_is_idempotent_and_keeps_reply_prefixes_first() -> None:
    once = add_case_tag("Re: Pre-op guide", "MT-2026-0042")
    assert once == "Re: [MT-2026-0042] Pre-op guide"
    assert add_case_tag(once, "MT-2026-0042") == once
    assert add_case_tag("[ mt-2026-0042 ] hi", "MT-2026-0042") == "[ mt-2026-0042 ] hi"
    assert add_case_tag("", "mt-2026-0042") == "[MT-2026-0042]"
    assert add_case_tag("line\r\nBcc: x", "MT-2026-0042") == "[MT-2026-0042] line Bcc: x"


def test_add_case_tag_for_another_case_puts_the_new_tag_first() -> None:
    tagged = add_case_tag("Fwd: [MT-2025-0007] Records", "MT-2026-0042")
    assert find_case_tags(tagged) == ["MT-2026-0042", "MT-2025-0007"]


def test_add_case_tag_refuses_a_non_id() -> None:
    with pytest.raises(ValueError, match="not a case id"):
        add_case_tag("x", "42")


@pytest.mark.parametrize(
    ("subject", "base"),
    [
        ("Re: [mxr] Topic", "topic"),
        ("[mxr] Re: Topic", "topic"),
        ("[mxr]", "[mxr]"),
        ("[Fwd: Wrapped Topic]", "wrapped topic"),
        ("Topic (fwd)", "topic"),
        ("Re:\tQuarterly   plan", "quarterly plan"),
        ("Re: Re:", ""),
        ("回复：[MT-2026-0042] Plan", "plan"),
    ],
)
def test_base_subject(subject: str, base: str) -> None:
    assert base_subject(subject) == base


def test_base_subject_custom_prefixes_replace_defaults() -> None:
    assert base_subject("Respuesta: Plan", ["respuesta"]) == "plan"
    assert base_subject("Re: Plan", ["respuesta"]) == "re: plan"
