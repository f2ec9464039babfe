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
