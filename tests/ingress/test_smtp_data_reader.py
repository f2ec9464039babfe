"""The block DATA reader and the other fast paths of the submission listener, checked against
the behaviour they replace.

``read_data`` runs on a real asyncio StreamReader (aiosmtpd's: limit 1001) fed block by block,
so every cut of the stream can be tried; its result is compared with ``reference_data``, a
line-by-line statement of aiosmtpd's smtp_DATA rules. ``fast_getaddr`` is compared with
aiosmtpd's own ``_getaddr`` and ``plain_header_block`` with the email package's parser.
"""

from __future__ import annotations

import asyncio
import random
from email import message_from_bytes, policy

import pytest
from aiosmtpd.smtp import SMTP

from mailhub.ingress.smtp_addresses import fast_getaddr
from mailhub.ingress.smtp_replies import _REWRITES
from mailhub.ingress.smtp_server import (
    TOO_LONG_REPLY,
    TOO_MUCH_REPLY,
    DataBody,
    HubSMTP,
    read_data,
    rewrite_reply,
)
from mailhub.parse.checks import check_message, plain_header_block

LINE_LIMIT = SMTP.line_length_limit  # 1001: 998 octets, CRLF and a transparency dot
Outcome = tuple[str | None, bytes, bytes]  # (error reply, message, bytes left after the end)


def reference_data(stream: bytes, size_limit: int) -> Outcome | None:
    """aiosmtpd's DATA rules, one CRLF line at a time; None if the end never comes.

    The error is the one met first in the stream: a line holding more than 999 bytes before its
    CRLF is wrong from its 1000th byte on, the body from the (size_limit + 1)th byte on."""
    pos, lines, long_at = 0, [], None
    while True:
        eol = stream.find(b"\r\n", pos)
        if eol < 0:
            return None
        line = stream[pos:eol + 2]
        if line == b".\r\n":
            break
        if len(line) > LINE_LIMIT and long_at is None:
            long_at = pos + LINE_LIMIT - 2
        lines.append(line)
        pos = eol + 2
    size = sum(map(len, lines))
    much_at = size_limit if size > size_limit else None
    error = None
    if long_at is not None and (much_at is None or long_at < much_at):
        error = TOO_LONG_REPLY
    elif much_at is not None:
        error = TOO_MUCH_REPLY
    content = b"" if error else b"".join(ln[1:] if ln[:1] == b"." else ln for ln in lines)
    return error, content, stream[pos + 3:]


def run_reader(blocks: list[bytes], size_limit: int) -> Outcome | None:
    """Feed ``blocks`` one at a time (each one a separate arrival) and read one DATA body."""

    async def go() -> Outcome | None:
        reader = asyncio.StreamReader(limit=LINE_LIMIT)
        body = DataBody(size_limit, LINE_LIMIT)
        task = asyncio.ensure_future(read_data(reader, body))
        for block in blocks:
            reader.feed_data(block)
            for _ in range(3):
                await asyncio.sleep(0)
        reader.feed_eof()
        try:
            await task
        except asyncio.IncompleteReadError:
            return None
        rest = await reader.read()
        return body.error, b"" if body.error else body.content(), rest

    return asyncio.run(go())


def cuts(stream: bytes, points: list[int]) -> list[bytes]:
    edges = [0, *sorted(points), len(stream)]
    return [stream[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a]


MESSAGE = b"Subject: x\r\n\r\nbody line\r\n.stuffed\r\n..two\r\n"


def test_end_marker_cut_at_every_place() -> None:
    stream = MESSAGE + b".\r\nMAIL FROM:<a@b.example>\r\n"
    want = (None, b"Subject: x\r\n\r\nbody line\r\nstuffed\r\n.two\r\n",
            b"MAIL FROM:<a@b.example>\r\n")
    assert reference_data(stream, 10_000) == want
    for point in range(1, len(stream)):
        assert run_reader(cuts(stream, [point]), 10_000) == want, point
    assert run_reader([bytes([b]) for b in stream], 10_000) == want


@pytest.mark.parametrize("stream,content", [
    (b".\r\n", b""),                                   # empty message
    (b"\r\n.\r\n", b"\r\n"),
    (b"..\r\n.\r\n", b".\r\n"),                         # a first line that is dot-stuffed
    (b".x\r\n..\r\n...\r\n.\r\n", b"x\r\n.\r\n..\r\n"),
    (b"a\r\n.\r\r\n.\r\n", b"a\r\n\r\r\n"),             # ".\r\r\n" is not the end
    (b"a\n.\nb\r\n.\r\n", b"a\n.\nb\r\n"),             # bare LF: no line end, no end, no dot removed
    (b"a\n.\r\n.\r\n", b"a\n.\r\n"),
    (b"x\r.\r\n.\r\n", b"x\r.\r\n"),
])
def test_dots_and_line_ends(stream: bytes, content: bytes) -> None:
    assert reference_data(stream, 1000) == (None, content, b"")
    for point in range(1, len(stream)):
        assert run_reader(cuts(stream, [point]), 1000) == (None, content, b""), point


def sized(size: int) -> bytes:
    """A body of exactly ``size`` bytes as sent (lines of 100 bytes with their CRLF)."""
    full, part = divmod(size, 100)
    body = (b"x" * 98 + b"\r\n") * full
    if part:
        assert part >= 2
        body = b"y" * (part - 2) + b"\r\n" + body
    assert len(body) == size
    return body


def test_size_limit_exact_and_one_over() -> None:
    limit = 4000
    assert run_reader([sized(limit) + b".\r\n"], limit) == (None, sized(limit), b"")
    blocks = cuts(sized(limit + 2) + b".\r\nNOOP\r\n", [1500, 3999, 4001])
    assert run_reader(blocks, limit) == (TOO_MUCH_REPLY, b"", b"NOOP\r\n")
    # dot-stuffing counts: the limit is on what is sent, as in aiosmtpd
    stuffed = b"." + sized(limit)[1:]
    assert run_reader([stuffed + b".\r\n"], limit)[0] is None
    assert run_reader([b"." + stuffed + b".\r\n"], limit)[0] == TOO_MUCH_REPLY


def test_line_length_limit() -> None:
    ok = b"a" * 999 + b"\r\n"
    too_long = b"a" * 1000 + b"\r\n"
    assert run_reader([ok + b".\r\n"], 100_000) == (None, ok, b"")
    # 998 octets, a transparency dot and CRLF: 1001 sent, the most a line may be (aiosmtpd)
    assert run_reader([b"." + ok[1:] + b".\r\n"], 100_000) == (None, ok[1:], b"")
    assert run_reader([b"." + ok + b".\r\n"], 100_000)[0] == TOO_LONG_REPLY
    for point in (1, 500, 999, 1000, 1001, 1002):  # the CRLF cut from its line, too
        got = run_reader(cuts(b"h\r\n" + too_long + b"tail\r\n.\r\nQUIT\r\n", [point]), 100_000)
        assert got == (TOO_LONG_REPLY, b"", b"QUIT\r\n"), point
    huge = b"From: a@b.example\r\nX-Long: " + b"a" * 100_000 + b"\r\n\r\nbody\r\n.\r\n"
    assert run_reader(cuts(huge, list(range(0, len(huge), 16384))), 10_000_000)[0] == TOO_LONG_REPLY


def test_line_accounting_whatever_the_cut() -> None:
    """A CRLF, or a line, cut between two blocks counts as if it came whole."""
    fits = (b"a" * 999 + b"\r\n") * 3
    over = b"a" * 999 + b"\r\n" + b"b" * 1000 + b"\r\n" + b"c\r\n"
    for cut in range(len(fits) + 1):
        for stream, error in ((fits, None), (over, TOO_LONG_REPLY)):
            body = DataBody(100_000, LINE_LIMIT)
            body.add(stream[:cut])
            body.add(stream[cut:])
            assert body.error == error, (cut, error)
    assert body.parts == []  # dropped once refused
    # the reader cuts there too: 1007 bytes arrive, the block it takes ends with the CR
    stream = b"h\r\n" + b"a" * 999 + b"\r\n" + b"b" * 999 + b"\r\n.\r\n"
    assert run_reader(cuts(stream, [1007]), 100_000) == (None, stream[:-3], b"")


def test_first_error_in_the_stream_decides() -> None:
    limit = 3000
    long_then_much = b"a" * 1200 + b"\r\n" + sized(4000) + b".\r\n"
    much_then_long = sized(3500) + b"b" * 1200 + b"\r\n.\r\n"
    for stream, error in ((long_then_much, TOO_LONG_REPLY), (much_then_long, TOO_MUCH_REPLY)):
        assert reference_data(stream, limit)[0] == error  # type: ignore[index]
        assert run_reader([stream], limit)[0] == error  # type: ignore[index]
        assert run_reader(cuts(stream, [700, 2000, 3600]), limit)[0] == error  # type: ignore[index]


def test_hang_up_before_the_end() -> None:
    assert run_reader([b"From: a@b.example\r\n\r\nhalf a mess"], 1000) is None
    assert run_reader([b"From: a@b.example\r\n\r\nhalf\r\n."], 1000) is None
    assert run_reader([], 1000) is None


TOKENS = [b"a", b"bc", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b".\r", b"\xe9\xff",
          b"x" * 300, b"y" * 700, b"z" * 1000, b"\r\n.\r", b" ", b"\t"]


def test_random_streams_match_the_line_by_line_rules() -> None:
    rnd = random.Random(5321)
    for case in range(400):
        body = b"".join(rnd.choice(TOKENS) for _ in range(rnd.randint(0, 40)))
        stream = body + b"\r\n.\r\n" + rnd.choice([b"", b"RSET\r\n", b"MAIL FROM:<a@b.c>\r\n"])
        limit = rnd.choice([50, 1000, 3000, 100_000])
        want = reference_data(stream, limit)
        points = [rnd.randint(1, max(1, len(stream) - 1)) for _ in range(rnd.randint(0, 6))]
        assert run_reader(cuts(stream, points), limit) == want, (case, stream, points, limit)


# --- MAIL/RCPT address parsing -----------------------------------------------------------------

ADDRESS_CASES = [
    "<a@b.example>", "<coord@medvoyage.example> SIZE=1000 BODY=8BITMIME", "<a.b+c@d-e.f>",
    "<a@b>  \t SMTPUTF8", "<a@b>(comment) SIZE=1", "<a@b> (comment)", "<a@b>SIZE=1",
    "<\"quoted local\"@b.example>", "<a..b@c>", "<.a@b>", "<a.@b>", "<a@b..c>", "<a@[127.0.0.1]>",
    "<=?utf-8?q?x?=@b.example>", "<a@=?utf-8?q?x?=>", "<@route:a@b>", "<>", "<a@b", "a@b.example",
    "<é@b.example>", "<a@bé.example>", "< a@b>", "<a @b>", "<a@b >", "<a@b>>", "<a@b><c@d>",
    "<a@b.example> x=y", "<a@b> \u00a0SIZE=1", "<a\\@b@c>", "<a%b@c>", "<a@b.c>\x0bSIZE=2",
]


def _random_address(rnd: random.Random) -> str:
    parts = ["a", "b", ".", "@", "<", ">", " ", "\t", "(", ")", "=?", "\"", "\\", "[", "]",
             ",", ":", ";", "é", "x9", "-", "+", "SIZE=1", "=", "?"]
    if rnd.random() < 0.5:
        return "<" + "".join(rnd.choice(parts) for _ in range(rnd.randint(0, 12)))
    # nearly plain: <local@domain>params, with now and then something that is not plain
    atoms = ["a", "b9", "c-d", "e+f", "g_h", "{", "~", "'", ".", "=", "?", "=?", "é", " ", "\"", "#"]
    local = "".join(rnd.choice(atoms) for _ in range(rnd.randint(1, 4)))
    domain = "".join(rnd.choice(atoms) for _ in range(rnd.randint(1, 4)))
    tail = rnd.choice(["", " SIZE=1", "  BODY=8BITMIME SMTPUTF8", "\t SIZE=2", "(c) SIZE=3",
                       " (c)", "SIZE=4", " \u00a0X", ">", " <x@y>", "\x0bX"])
    return f"<{local}@{domain}>{tail}"


def _outcome(server: SMTP, arg: str) -> object:
    """aiosmtpd's ``_getaddr`` result; where its parser raises ("<@"), HubSMTP's answer:
    a malformed address."""
    try:
        return server._getaddr(arg)
    except Exception:  # noqa: BLE001 - any failure of the email package's parser
        return None, None


def test_fast_getaddr_gives_aiosmtpd_results() -> None:
    stock = SMTP.__new__(SMTP)  # only _getaddr and its class attributes are used
    hub = HubSMTP.__new__(HubSMTP)
    rnd = random.Random(2821)
    cases = ADDRESS_CASES + [_random_address(rnd) for _ in range(3000)]
    fast_hits = 0
    for arg in cases:
        assert hub._getaddr(arg) == _outcome(stock, arg), arg
        fast_hits += fast_getaddr(arg) is not None
    assert fast_hits > 20  # the fast path is taken, not only the fallback
    assert fast_getaddr("<coord@medvoyage.example> SIZE=10") == ("coord@medvoyage.example",
                                                                  "SIZE=10")
    assert fast_getaddr("<\"q\"@b.example>") is None


def test_rewrite_reply_same_as_scanning_every_rule() -> None:
    def linear(status: str) -> str:
        for pattern, replacement in _REWRITES:
            if pattern.search(status):
                return pattern.sub(replacement, status, count=1)
        return status

    samples = ["500 Line too long (see RFC5321 4.5.3.1.6)", "500 Command line too long",
               "552 Error: Too much mail data", "530 5.7.0 Authentication required",
               "530 Must issue a STARTTLS command first", '500 Error: command "X" not recognized',
               "503 Error: need MAIL command", "503 Error: need RCPT command",
               "503 Error: nested MAIL command", "503 Error: send HELO first",
               "501 Syntax: MAIL FROM: <address>", "501 Not enough value", "501 Too many values",
               "503 Already authenticated", "500 Error: strict ASCII mode",
               "554 Command refused due to lack of security", "250 OK", "354 End data", "", "5",
               "250 2.0.0 Ok: queued as 1", "500 Error: bad syntax", "221 Bye", "250 OK x",
               "500 Error: (IndexError) list index out of range", "220 Ready to start TLS",
               "220 medvoyage.example mailhub ESMTP", "501 Error: SMTPUTF8 disabled"]
    for status in samples:
        assert rewrite_reply(status) == linear(status), status
    assert rewrite_reply(TOO_MUCH_REPLY).startswith("552 5.3.4 ")
    assert rewrite_reply(TOO_LONG_REPLY).startswith("500 5.5.2 ")


# --- header checks at the end of DATA ----------------------------------------------------------

HEADER_BLOCKS = [
    b"From: a@b.example\r\nSubject: x\r\n",
    b"From: a@b.example\r\nSubject:   folded\r\n  more\r\n\tand more\r\nTo: c@d\r\n",
    b"Subject:\r\n value on the next line\r\nFrom:a@b",
    b"From: a@b\r\nContent-Type: multipart/mixed; boundary=\"x\"\r\n",
    b"From: a@b\r\nContent-Type: message/rfc822\r\n",
    b"From: a@b\r\nSubject: caf\xc3\xa9 \xff\r\n",
    b"From: a@b\r\nSubject: x \r\n \r\n",
    b"From a@b Mon Jan  1 00:00:00 2026\r\nFrom: a@b\r\n",
    b" continuation first\r\nFrom: a@b\r\n",
    b"From: a@b\nSubject: bare LF\n",
    b"From: a@b\r\nSubject: bare\rCR\r\n",
    b"From: a@b\r\n: no name\r\n",
    b"From: a@b\r\nnot a header\r\n",
    b"From: a@b\r\nX-\x7f: odd name\r\n",
    b"Message-ID: <1@b>\r\nMessage-ID: <2@b>\r\nFrom: a@b\r\n",
]


def test_plain_header_block_matches_the_email_parser() -> None:
    rnd = random.Random(5322)
    pieces = [b"From", b"To", b"Subject", b":", b" ", b"\t", b"\r\n", b"\n", b"\r", b"x", b"\xe9",
              b"Content-Type: message/rfc822", b"Content-Type: multipart/mixed", b"From "]
    blocks = HEADER_BLOCKS + [b"".join(rnd.choice(pieces) for _ in range(rnd.randint(1, 25)))
                              for _ in range(2000)]
    fast = 0
    for head in blocks:
        if b"\r\n\r\n" in head or b"\n\n" in head:
            continue
        mine = plain_header_block(head)
        if mine is None:
            continue
        fast += 1
        parsed = message_from_bytes(head + b"\r\n\r\n", policy=policy.compat32)
        assert mine.items() == parsed.items(), head
        assert mine.get_payload() == parsed.get_payload(), head
        assert mine.get_content_type() == parsed.get_content_type(), head
    assert fast > 50
    assert plain_header_block(HEADER_BLOCKS[0]) is not None
    for odd in HEADER_BLOCKS[4], HEADER_BLOCKS[7], HEADER_BLOCKS[8], HEADER_BLOCKS[9]:
        assert plain_header_block(odd) is None


def test_check_message_refusals_unchanged() -> None:
    from mailhub.errors import PolicyRefusal

    assert check_message(b"From: a@b\r\nMessage-ID: <1@b>\r\n\r\nhi\r\n")["Message-ID"] == "<1@b>"
    for bad in (HEADER_BLOCKS[-1] + b"\r\nbody\r\n", b"Subject: x\r\n\r\nno from\r\n", b"  \r\n",
                b"From: a@b\r\nSubject: 1\r\nSubject: 2\r\n\r\n"):
        with pytest.raises(PolicyRefusal):
            check_message(bad)


def test_the_short_line_probe_agrees_with_counting_every_line() -> None:
    """The window probe for blocks of short lines decides as splitting into lines does, for
    lines around the limit and around half of it, cut anywhere."""

    class Counting(DataBody):
        __slots__ = ()

        def _all_lines_short(self, data: bytes) -> bool:
            return False

    taken: list[bool] = []

    class Probing(DataBody):
        __slots__ = ()

        def _all_lines_short(self, data: bytes) -> bool:
            taken.append(super()._all_lines_short(data))
            return taken[-1]

    rnd = random.Random(53211)
    lengths = [0, 1, 66, 497, 498, 499, 500, 501, 997, 998, 999, 1000, 1500]
    for _ in range(400):
        lines = [b"x" * rnd.choice(lengths) for _ in range(rnd.randint(1, 12))]
        stream = b"\r\n".join(lines) + rnd.choice([b"", b"\r", b"\r\n", b"tail"])
        points = sorted(rnd.sample(range(1, len(stream)), min(3, len(stream) - 1))) if len(
            stream) > 1 else []
        fast, slow = Probing(10_000_000, LINE_LIMIT), Counting(10_000_000, LINE_LIMIT)
        for block in cuts(stream, points):
            fast.add(block)
            slow.add(block)
            assert (fast.error, fast.run, fast.cr) == (slow.error, slow.run, slow.cr), (
                [len(x) for x in lines], points)
    assert taken.count(True) > 100 and taken.count(False) > 100  # both ways were tried
