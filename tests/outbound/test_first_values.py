"""``first_values`` (one pass over the header block) answers exactly as ``get_header``."""

from __future__ import annotations

import random

from mailhub.outbound.pipeline import ensure_headers, first_values, visible_recipients
from mailhub.parse.rawheaders import get_header

NAMES = ("message-id", "date", "to", "cc", "subject")


def test_random_header_blocks_answer_like_get_header() -> None:
    rng = random.Random(11)
    lines = [b"To: a@x.example", b"TO: second@x.example", b"Cc: c@y.example", b"cc:",
             b"Message-ID: <m1@x.example>", b"message-id:   <m2@x.example>  ", b"Date: today",
             b"  folded, d@z.example", b"\tmore", b"Subject: caf\xc3\xa9", b"X-Other: 1",
             b"not a header", b"Date"]
    for _ in range(2000):
        eol = rng.choice([b"\r\n", b"\n"])
        head = eol.join(rng.choice(lines) for _ in range(rng.randint(0, 8)))
        raw = head + eol + eol + b"body" + eol + b"To: body@x.example" + eol
        found = first_values(raw, NAMES)
        for name in NAMES:
            assert found.get(name) == get_header(raw, name), (raw, name)


def test_ensure_headers_keeps_an_id_and_adds_what_is_missing() -> None:
    raw, mid = ensure_headers(b"Message-ID: <k@x.example>\r\nBcc: hidden@x.example\r\n"
                              b"To: A <a@x.example>\r\n\r\nbody\r\n", "hub.example")
    assert mid == "<k@x.example>"
    assert get_header(raw, "Bcc") is None and get_header(raw, "Date")
    assert visible_recipients(raw) == {"a@x.example"}
    raw2, mid2 = ensure_headers(b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nbody\r\n",
                                "hub.example")
    assert mid2.endswith("@hub.example>") and get_header(raw2, "Message-ID") == mid2
    assert raw2.count(b"Date:") == 1
