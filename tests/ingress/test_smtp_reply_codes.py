"""Enhanced status codes (RFC 2034) on every reply the listeners send, as they advertise.

Exempt, as RFC 2034 and Postfix have it: the greeting, the replies to HELO/EHLO, the 334 AUTH
challenges and 354. Two checks: every reply text in the installed aiosmtpd's source comes out of
``rewrite_reply`` with a code of its class (so an aiosmtpd upgrade with new texts fails here), and
a real submission session walks through the commands and looks at each reply on the wire.
"""

from __future__ import annotations

import ast
import base64
import inspect
import re
import smtplib
import ssl

import aiosmtpd.smtp

from mailhub.ingress.smtp_replies import rewrite_reply
from tests.conftest import Instance
from tests.deliver.test_relay_e2e import COORD, PASSWORD

REPLY_TEXT = re.compile(r"^\d{3} ")
ENHANCED = re.compile(r"^([245])\d\d ([245])\.\d{1,3}\.\d{1,3} ")
# aiosmtpd's greeting ('220 {} {}'), HELO's reply ('250 {}'), EHLO's last line, DATA's go-ahead
EXEMPT = re.compile(r"^(220 X X|250 X|250 HELP|354 .*)\Z")


def aiosmtpd_reply_texts() -> list[str]:
    """String literals in aiosmtpd/smtp.py that start like a reply, placeholders as "X"."""
    tree = ast.parse(inspect.getsource(aiosmtpd.smtp))
    parts_of_fstrings = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr)
                         for v in node.values}
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "X" for v in node.values)
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and id(node) not in parts_of_fstrings):
            text = re.sub(r"\{[^}]*\}", "X", node.value)
        else:
            continue
        if REPLY_TEXT.match(text):
            texts.append(text)
    return texts


def lacks_code(reply: str) -> bool:
    m = ENHANCED.match(reply)
    return m is None or m.group(1) != m.group(2)


def test_every_aiosmtpd_reply_text_gets_an_enhanced_code() -> None:
    texts = aiosmtpd_reply_texts()
    assert len(texts) > 40  # the scan finds aiosmtpd's replies, not nothing
    missing = [(text, rewrite_reply(text)) for text in texts
               if not EXEMPT.match(text) and lacks_code(rewrite_reply(text))]
    assert missing == []


def plain_auth(login: str, password: str) -> str:
    return "PLAIN " + base64.b64encode(f"\0{login}\0{password}".encode()).decode()


BEFORE_EHLO: list[tuple[str | bytes, int]] = [
    ("NOOP", 250), ("NOOP ignored", 250), ("RSET", 250), ("RSET x", 501), ("HELP", 530),
    ("VRFY x", 530), ("EXPN x", 502), (f"MAIL FROM:<{COORD}>", 503), ("AUTH PLAIN", 503),
    ("FROBNICATE", 500), (b"\xff\xfe", 500), (b"", 500),
]
AFTER_HELO: list[tuple[str | bytes, int]] = [("AUTH PLAIN", 500), ("EHLO", 501)]
BEFORE_TLS: list[tuple[str | bytes, int]] = [
    ("AUTH PLAIN Zm9v", 538), ("STARTTLS x", 501), (f"MAIL FROM:<{COORD}>", 530),
]
BEFORE_AUTH: list[tuple[str | bytes, int]] = [
    ("STARTTLS", 503), ("AUTH", 501), ("AUTH PLAIN a b", 501), ("AUTH CRAM-MD5", 504),
    ("AUTH PLAIN !!!", 501), ("AUTH " + plain_auth(COORD, "wrong"), 535),
    ("AUTH PLAIN", 334), ("*", 501),  # an AUTH the client gives up with "*"
    ("AUTH " + plain_auth(COORD, PASSWORD), 235), ("AUTH " + plain_auth(COORD, PASSWORD), 503),
]
AUTHENTICATED: list[tuple[str | bytes, int]] = [
    ("HELP", 250), ("HELP MAIL", 250), ("HELP FROBNICATE", 501), (f"VRFY <{COORD}>", 252),
    ("VRFY <<<", 502), ("VRFY", 501), ("EXPN x", 502),
    (f"MAIL FROM:<{COORD}> SIZE=999999999", 552), (f"MAIL FROM:<{COORD}> BODY=X", 501),
    (f"MAIL FROM:<{COORD}> SMTPUTF8=1", 501), (f"MAIL FROM:<{COORD}> FOO=1", 555),
    ("MAIL FROM:", 501), ("MAIL FROM:<@>", 553), ("MAIL FROM:<someone@gmail.example>", 553),
    ("RCPT TO:<desk@travel.example>", 503), ("DATA", 503),
    (f"MAIL FROM:<{COORD}>", 250), (f"MAIL FROM:<{COORD}>", 503),
    ("RCPT TO:<desk@travel.example> FOO=1", 555), ("RCPT TO:", 501),
    ("RCPT TO:<not valid>", 553), ("RCPT TO:<desk@travel.example>", 250), ("DATA x", 501),
    ("DATA", 354), (b"From: " + COORD.encode() + b"\r\nSubject: walk\r\n\r\nbody\r\n.", 250),
    ("NOOP", 250), ("RSET", 250), ("QUIT x", 501), ("QUIT", 221),
]


def walk(s: smtplib.SMTP, steps: list[tuple[str | bytes, int]], seen: list[str]) -> None:
    """Send each command, check its reply code, and keep the reply for the code check."""
    for command, expected in steps:
        s.send(command + b"\r\n" if isinstance(command, bytes) else f"{command}\r\n")
        code, text = s.getreply()
        reply = f"{code} {text.decode(errors='replace')}"
        assert code == expected, (command, reply)
        if code not in (334, 354):
            seen.append(reply)


def test_session_replies_carry_enhanced_codes(served: Instance) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    seen: list[str] = []
    s = smtplib.SMTP("127.0.0.1", served.submission_port, timeout=30)
    try:
        walk(s, BEFORE_EHLO, seen)
        assert s.helo("client.example")[0] == 250
        walk(s, AFTER_HELO, seen)
        assert s.ehlo("client.example")[0] == 250
        walk(s, BEFORE_TLS, seen)
        code, text = s.starttls(context=ctx)
        seen.append(f"{code} {text.decode()}")
        assert s.ehlo("client.example")[0] == 250
        walk(s, BEFORE_AUTH + AUTHENTICATED, seen)
    finally:
        s.close()
    assert len(seen) > 50
    assert [reply for reply in seen if lacks_code(reply)] == []
