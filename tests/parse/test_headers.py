"""Header access on hostile input: decoded, single-line, bounded, never raising."""

from __future__ import annotations

from email import message_from_bytes, policy
from email.message import Message

import pytest

from mailhub.parse.headers import (
    MAX_HEADER_CHARS,
    addresses,
    decode_words,
    normalize_address,
    raw_headers,
    safe_header,
    strip_crlf,
)

POLICIES = [policy.compat32, policy.default, policy.SMTPUTF8]


def parse(raw: bytes, pol: policy.Policy) -> Message:
    return message_from_bytes(raw, policy=pol)


@pytest.mark.parametrize("pol", POLICIES)
def test_encoded_words_are_decoded_and_joined(pol: policy.Policy) -> None:
    raw = b"Subject: =?utf-8?b?w6k=?= =?utf-8?b?w6k=?= and =?ISO-8859-1?Q?caf=E9_au_lait?=\r\n\r\n"
    assert safe_header(parse(raw, pol), "subject") == "éé and café au lait"


def test_a_character_split_across_two_encoded_words_is_rebuilt() -> None:
    raw = b"Subject: =?utf-8?b?4oK=?= =?utf-8?b?rA==?= 100\r\n\r\n"
    assert safe_header(parse(raw, policy.compat32), "Subject") == "€ 100"


@pytest.mark.parametrize("pol", POLICIES)
def test_broken_charsets_become_replacement_characters(pol: policy.Policy) -> None:
    raw = (
        b"Subject: =?x-unknown?q?a=E9b?= =?base64?b?aGk=?= \xff\xfe raw\r\n"
        b"X-Bad-B64: =?utf-8?b?!!!?= =?utf-8?b?w6?=\r\n\r\n"
    )
    msg = parse(raw, pol)
    subject = safe_header(msg, "Subject")
    assert subject.startswith("a\ufffdb")
    assert "\ufffd\ufffd raw" in subject
    assert safe_header(msg, "X-Bad-B64") == "\ufffd"  # '!!!' decodes to nothing, 'w6' to 0xC3


@pytest.mark.parametrize("pol", POLICIES)
def test_crlf_hidden_in_an_encoded_word_is_removed(pol: policy.Policy) -> None:
    raw = b"Subject: =?utf-8?q?hello=0D=0ABcc:_victim@x.example?=\r\n\r\n"
    value = safe_header(parse(raw, pol), "Subject")
    assert "\r" not in value and "\n" not in value
    assert value == "hello Bcc: victim@x.example"


def test_folded_header_is_unfolded_and_first_occurrence_wins() -> None:
    raw = b"Subject: part one\r\n\tpart two\r\nSubject: second\r\n\r\n"
    msg = parse(raw, policy.compat32)
    assert safe_header(msg, "SUBJECT") == "part one part two"
    assert len(raw_headers(msg, "subject")) == 2


def test_ten_kilobyte_subject_is_truncated() -> None:
    raw = b"Subject: " + b"x" * 10_240 + b"\r\n\r\n"
    msg = parse(raw, policy.default)
    assert len(safe_header(msg, "Subject")) == MAX_HEADER_CHARS
    assert safe_header(msg, "Subject", limit=10) == "x" * 10


def test_absent_header_is_empty() -> None:
    assert safe_header(parse(b"From: a@b\r\n\r\n", policy.default), "Subject") == ""


def test_programmatically_set_headers_work_too() -> None:
    msg = Message()
    msg["Subject"] = "Grüße"
    assert safe_header(msg, "Subject") == "Grüße"


def test_decode_words_leaves_plain_text_alone() -> None:
    assert decode_words("no =?words here") == "no =?words here"


@pytest.mark.parametrize("pol", POLICIES)
def test_addresses_lowercase_domain_keep_local_and_dedupe(pol: policy.Policy) -> None:
    raw = (
        b'To: "evil@attacker.example" <Patient.Name@EXAMPLE.com>, '
        b"=?utf-8?q?Clinic=2C_Dr_X_=3Cfake=40x=3E?= <dr@Clinic-A.example>\r\n"
        b"Cc: patient.name@example.COM, Patient.Name@example.com, garbage <<>>\r\n\r\n"
    )
    found = addresses(parse(raw, pol), "To", "Cc")
    assert found == ["Patient.Name@example.com", "dr@clinic-a.example", "patient.name@example.com"]


def test_addresses_ignore_addresses_in_quoted_phrases_and_comments() -> None:
    raw = b'From: "x@evil.example" (y@evil.example) <real@ok.example\r\n\r\n'
    assert addresses(parse(raw, policy.compat32), "From") == ["real@ok.example"]
    raw = b'From: "x@evil.example" (y@evil.example) <\xff\xfe@\r\n\r\n'
    assert addresses(parse(raw, policy.compat32), "From") == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("<Foo.Bar@Example.COM>", "Foo.Bar@example.com"),
        ("a@b.example.", "a@b.example"),
        ("no-at-sign", None),
        ("a b@c", None),
        ("a@b,c", None),
        ("", None),
    ],
)
def test_normalize_address(value: str, expected: str | None) -> None:
    assert normalize_address(value) == expected


def test_strip_crlf_prevents_header_injection() -> None:
    assert strip_crlf("Ana\r\nBcc: x@y.example") == "Ana Bcc: x@y.example"
    assert strip_crlf("a\u2028b\x00c") == "a b c"
    assert strip_crlf(None) == ""


def test_plain_mailboxes_read_as_the_rfc5322_parser_reads_them() -> None:
    """The shortcut for plain ``a@b`` and ``Name <a@b>`` values agrees with ``getaddresses``,
    and leaves anything else to it."""
    import random
    from email.utils import getaddresses

    from mailhub.parse.headers import _plain_mailboxes

    rnd = random.Random(5322)
    pieces = ["a", "b", "Z", "0", "_", "+", "-", ".", "@", "x.example", " ", "\t", "<", ">", ",",
              "Name", '"', "(", ")", "\\", ";", ":", "é", "@@", "<a@b>", "c@d.e"]
    taken = 0
    for _ in range(50000):
        raw = "".join(rnd.choice(pieces) for _ in range(rnd.randint(1, 12)))
        mine = _plain_mailboxes(raw)
        if mine is None:
            continue
        taken += 1
        assert mine == [a for _, a in getaddresses([raw]) if a], raw
    assert taken > 200
    assert _plain_mailboxes("Ann Smith <ann@x.example>, bob@y.example") == [
        "ann@x.example", "bob@y.example"]
    for odd in ('"Smith, Ann" <ann@x.example>', "ann@x.example (Ann)", "a@b,", "<@r:a@b>"):
        assert _plain_mailboxes(odd) is None
