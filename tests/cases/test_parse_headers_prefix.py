"""``parse_headers`` (a prefix, headers only) must see exactly the headers a full parse sees."""

from __future__ import annotations

import random

import pytest

from mailhub.cases.store import parse_headers, parse_message

ENDINGS = [b"\r\n", b"\n", b"\r"]
SAMPLES = [
    b"From: a@x.example\r\nTo: b@y.example\r\nSubject: hi\r\n\r\nbody\r\nSubject: no\r\n",
    b"From: a@x.example\nSubject: bare LF\n\nTo: not-a-header@y.example\n",
    b"From: a@x.example\rSubject: bare CR\r\rTo: body@y.example\r",
    b"Subject: folded\r\n  over two lines\r\nTo: b@y.example\r\n\r\n",
    b"\r\nTo: after-a-leading-blank-line@y.example\r\n\r\n",
    b"From: a@x.example\r\nnot a header line\r\nTo: b@y.example\r\n\r\nbody",
    b"From: a@x.example\r\nTo: b@y.example",  # no body at all
    b"From: a@x.example\r\n\r\n\r\nTo: body@y.example\r\n",
    b"From: a@x.example\r\nSubject: mixed\n\r\nTo: body@y.example\r\n",
    b"From: a@x.example\r\r\nTo: after-cr-crlf@y.example\r\n\r\n",
]


def same_headers(raw: bytes) -> None:
    full, head = parse_message(raw), parse_headers(raw)
    assert head.items() == full.items(), raw
    assert [type(d) for d in head.defects] == [type(d) for d in full.defects], raw


@pytest.mark.parametrize("raw", SAMPLES)
def test_known_shapes_parse_alike(raw: bytes) -> None:
    same_headers(raw)


def test_random_line_endings_parse_alike() -> None:
    rng = random.Random(5)
    parts = [b"From: a@x.example", b"To: b@y.example", b"Subject: s", b"  folded", b"",
             b"body line", b"Cc: c@z.example", b"x", b""]
    for _ in range(3000):
        lines = [rng.choice(parts) for _ in range(rng.randint(1, 9))]
        raw = b"".join(line + rng.choice(ENDINGS) for line in lines)
        same_headers(raw)
        same_headers(raw[:-1])


def test_a_large_body_is_not_read() -> None:
    raw = b"From: a@x.example\r\nSubject: big\r\n\r\n" + b"y" * 1_000_000
    head = parse_headers(raw)
    assert head["Subject"] == "big"
    assert len(str(head.get_payload())) < 10


def test_plain_header_blocks_skip_the_parser_and_read_the_same() -> None:
    """The fast path for plain CRLF header blocks gives what the email parser gives."""
    from email.parser import BytesParser
    from email.policy import compat32

    from mailhub.cases import store

    rnd = random.Random(822)
    pieces = [b"From", b"To", b"Subject", b":", b" ", b"\t", b"\r\n", b"\n", b"\r", b"x", b"\xe9",
              b"Content-Type: message/rfc822", b"Content-Type: multipart/mixed", b"From ",
              b"\r\n\r\n", b"body"]
    blocks = SAMPLES + [b"".join(rnd.choice(pieces) for _ in range(rnd.randint(1, 30)))
                        for _ in range(5000)]
    fast = 0
    for raw in blocks:
        found = store._BLANK_LINE.search(raw)
        head = raw if found is None else raw[: found.end() + 1]
        slow = BytesParser(policy=compat32).parsebytes(head, headersonly=True)
        mine = parse_headers(raw)
        assert mine.items() == slow.items(), raw
        assert mine.get_payload() == slow.get_payload(), raw
        assert [type(d) for d in mine.defects] == [type(d) for d in slow.defects], raw
        assert mine.get_content_type() == slow.get_content_type(), raw
        fast += head.endswith(b"\r\n\r\n") and store.plain_header_block(head[:-2]) is not None
    assert fast > 100  # the fast path was really exercised
