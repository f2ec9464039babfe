"""The wire helpers as pure functions: replies parsed as smtplib parses them, DATA payloads
stuffed and terminated as smtplib sends them, addresses quoted as smtplib quotes them."""

from __future__ import annotations

import random
import re
import smtplib

import pytest

from mailhub.deliver.smtp_wire import (
    Disconnected,
    Reply,
    ReplyReader,
    ReplyTooLong,
    data_payload,
    envelope,
    is_wire_clean,
    parse_reply,
    quote_address,
)


def test_parse_reply_single_multi_and_partial() -> None:
    assert parse_reply(b"250 2.1.0 ok\r\n") == (Reply(250, "2.1.0 ok"), 14)
    multi = b"550-5.1.1 no such user\r\n550-5.1.1 really\r\n550 5.1.1 see postmaster\r\nNEXT"
    reply, end = parse_reply(multi) or (None, 0)
    assert reply == Reply(550, "5.1.1 no such user\n5.1.1 really\n5.1.1 see postmaster")
    assert multi[end:] == b"NEXT"
    assert parse_reply(multi[:30]) is None  # the last line has not arrived
    assert parse_reply(b"354\r\n") == (Reply(354, ""), 5)
    assert parse_reply(b"250 bare line feed\n") == (Reply(250, "bare line feed"), 19)
    assert parse_reply(b"xyz garbage\r\n") == (Reply(-1, "garbage"), 13)
    assert parse_reply(b"250 caf\xe9\r\n") == (Reply(250, "caf\ufffd"), 10)


def test_parse_reply_too_long() -> None:
    with pytest.raises(ReplyTooLong):
        parse_reply(b"250 " + b"x" * 9000)
    with pytest.raises(ReplyTooLong):
        parse_reply(b"250 " + b"x" * 9000 + b"\r\n")
    endless = b"250-short line\r\n" * 10_000  # each line short, the reply without end
    with pytest.raises(ReplyTooLong):
        parse_reply(endless)
    with pytest.raises(ReplyTooLong):
        parse_reply(endless + b"250 done\r\n")
    assert parse_reply(b"250-a\r\n" * 100 + b"250 b\r\n") is not None  # a long real one


def test_enhanced_status_codes() -> None:
    assert Reply(550, "5.1.1 no such user").enhanced == "5.1.1"
    assert Reply(451, "4.3.0 try later").enhanced == "4.3.0"
    assert Reply(250, "2.0.0").enhanced == "2.0.0"
    assert Reply(550, "4.1.1 class mismatch").enhanced == ""
    assert Reply(550, "no such user").enhanced == ""
    assert Reply(550, "5.1.1234 too many digits").enhanced == ""
    assert str(Reply(550, "5.1.1 no")) == "550 5.1.1 no"


def test_reader_serves_pipelined_replies_from_one_read() -> None:
    chunks = [b"250 ok\r\n250 2.1.5 ok\r\n354 go", b" ahead\r\n", b""]
    calls: list[int] = []

    def recv(size: int) -> bytes:
        calls.append(size)
        return chunks.pop(0)

    reader = ReplyReader(recv)
    assert [reader.read() for _ in range(3)] == [
        Reply(250, "ok"), Reply(250, "2.1.5 ok"), Reply(354, "go ahead")]
    assert len(calls) == 2
    with pytest.raises(Disconnected):
        reader.read()


def reference_payload(data: bytes) -> bytes:
    """smtplib's own steps for a str message: line ends fixed, then its period quoting."""
    fixed = re.sub(rb"(?:\r\n|\n|\r(?!\n))", b"\r\n", data)
    quoted = smtplib._quote_periods(fixed)  # type: ignore[attr-defined]
    if quoted[-2:] != b"\r\n":
        quoted += b"\r\n"
    return quoted + b".\r\n"


def test_data_payload_matches_smtplib() -> None:
    rng = random.Random(7)
    pieces = [b".", b"..", b"\r\n", b"\n", b"\r", b"a", b"\xff", b"\r\n.\r\n", b" "]
    cases = [b"", b".", b"\r\n", b"a\r\n", b".\r\n.\r\n", b"x\r\n.\r\n", b"\r\r\n\n"]
    cases += [b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
              for _ in range(3000)]
    for data in cases:
        assert data_payload(data) == reference_payload(data), data


def test_data_payload_examples() -> None:
    assert data_payload(b"a\r\n.b\r\n") == b"a\r\n..b\r\n.\r\n"
    assert data_payload(b"no end") == b"no end\r\n.\r\n"
    assert data_payload(b".\n") == b"..\r\n.\r\n"
    big = b"line\r\n" * 1000
    assert data_payload(big) == big + b".\r\n"


def test_quote_address_matches_smtplib() -> None:
    for address in ["a@b.example", "", "<already@quoted>", "Name <n@b.example>",
                    "o'brien+tag@b.example", "pacienté@b.example", "\"quoted local\"@b.example",
                    "weird(comment)@b.example"]:
        assert quote_address(address) == smtplib.quoteaddr(address), address


def test_envelope_commands() -> None:
    assert envelope("a@b.example", "c@d.example", size=12, smtputf8=False) == (
        b"MAIL FROM:<a@b.example> SIZE=12\r\n", b"RCPT TO:<c@d.example>\r\n")
    assert envelope("", "c@d.example", size=None, smtputf8=False)[0] == b"MAIL FROM:<>\r\n"
    mail, rcpt = envelope("é@b.example", "c@d.example", size=None, smtputf8=True)
    assert mail == "MAIL FROM:<é@b.example> SMTPUTF8\r\n".encode()
    with pytest.raises(UnicodeEncodeError):
        envelope("é@b.example", "c@d.example", size=None, smtputf8=False)


def test_data_payload_fast_paths_match_the_plain_rules() -> None:
    """The count/replace shortcuts give what the line-by-line rules give, for any mix of
    CR, LF, CRLF and leading dots (LF-only armor, CRLF mail, mixed, bare CRs)."""
    import random
    import re

    eol, dot = re.compile(rb"\r\n|\r|\n"), re.compile(rb"^\.", re.M)

    def plain(data: bytes) -> bytes:
        data = dot.sub(b"..", eol.sub(b"\r\n", data))
        return data + (b"" if data.endswith(b"\r\n") else b"\r\n") + b".\r\n"

    rnd = random.Random(2920)
    pieces = [b"a", b"\r", b"\n", b"\r\n", b".", b"\n.", b"x", b"\r\n."]
    for _ in range(20000):
        data = b"".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 20)))
        assert data_payload(data) == plain(data), data
    armor = b"-----BEGIN PGP MESSAGE-----\n\n" + b"hQEMA+x/y\n" * 500 + b"-----END PGP MESSAGE-----\n"
    assert data_payload(armor) == plain(armor)


def test_is_wire_clean() -> None:
    assert is_wire_clean(b"a\r\nb.\r\n\r\n")
    for dirty in (b"a\nb\r\n", b"a\rb\r\n", b"a\r\n.b\r\n", b".a\r\n", b"a\r\r\n"):
        assert not is_wire_clean(dirty), dirty


BODY = (b"This is an OpenPGP/MIME encrypted message (RFC 4880 and 3156)\r\n--b\r\n"
        b"Content-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n--b--\r\n")


def test_clean_body_checks_the_header_block_only() -> None:
    clean = b"From: a@b.example\r\nSubject: ...\r\n\r\n" + BODY
    assert data_payload(clean, clean_body=True) == data_payload(clean) == clean + b".\r\n"
    # the header block came from the submitted message: when it is not wire-clean (a bare LF,
    # a line starting with "."), or the whole does not end in CRLF, the full rules apply
    for dirty in (b"From: a@b.example\nX: y\r\n\r\n" + BODY, b".X: y\r\n\r\n" + BODY,
                  b"X: y\r\n\r\n" + BODY + b"tail", b"X: y\r\n" + BODY):
        assert data_payload(dirty, clean_body=True) == data_payload(dirty), dirty
    # what follows the header block is taken as the hub's writers made it: no search in it
    vouched = b"X: y\r\n\r\n" + BODY + b".not-from-a-writer\r\n"
    assert data_payload(vouched, clean_body=True) == vouched + b".\r\n"
