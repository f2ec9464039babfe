"""Hostile and broken input on the listeners: clear replies with enhanced codes, never a crash.

After each abuse the listener must still serve a normal conversation.
"""

from __future__ import annotations

import base64
import logging
import smtplib
import socket
import ssl
import time

import pytest

from tests.conftest import Instance
from tests.deliver.test_relay_e2e import COORD, PASSWORD
from tests.ingress.test_smtp_starttls import assert_no_traceback

HUB = "intake@medvoyage.example"


def tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def still_serves(inst: Instance) -> None:
    with smtplib.SMTP("127.0.0.1", inst.inbound_port, timeout=30) as s:
        s.ehlo()
        assert s.mail("a@example.org")[0] == 250
        assert s.rcpt(HUB)[0] == 250
        code, _ = s.data(b"From: a@example.org\r\nSubject: ok\r\n\r\nfine\r\n")
        assert code == 250


def inbound_data(inst: Instance, data: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", inst.inbound_port, timeout=30) as s:
        s.ehlo()
        s.mail("a@example.org")
        s.rcpt(HUB)
        try:
            return s.data(data)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error


@pytest.mark.parametrize("data,code,status", [
    (b"Subject: x\r\nSubject: y\r\nFrom: a@example.org\r\n\r\nbody\r\n", 550, b"5.6.0"),
    (b"Subject: no sender\r\n\r\nbody\r\n", 550, b"5.6.0"),
    (b"From: a@example.org\r\nX-Long: " + b"a" * 100_000 + b"\r\n\r\nbody\r\n", 500, b"5.5.2"),
])
def test_broken_messages_refused_clearly(served: Instance, data: bytes, code: int,
                                         status: bytes) -> None:
    got_code, text = inbound_data(served, data)
    assert got_code == code and text.startswith(status), (got_code, text)
    still_serves(served)


def test_garbage_bytes_and_malformed_mime_accepted_or_refused_cleanly(served: Instance) -> None:
    garbage = b"From: a@example.org\r\nContent-Type: multipart/mixed; boundary=\r\n\r\n" + (bytes(
        range(128, 256)) + b"\r\n") * 20 + b"--\r\n"
    code, _ = inbound_data(served, garbage)
    assert code in (250, 550)
    still_serves(served)


def test_oversized_message(served: Instance) -> None:
    from tests.conftest import set_config  # noqa: F401  (size comes from the config)

    big = b"From: a@example.org\r\n\r\n" + (b"x" * 998 + b"\r\n") * 27_000
    code, text = inbound_data(served, big)
    assert code == 552 and text.startswith(b"5.3.4")
    still_serves(served)


def test_cut_session_mid_data(served: Instance) -> None:
    sock = socket.create_connection(("127.0.0.1", served.inbound_port), timeout=10)
    f = sock.makefile("rwb")
    f.readline()
    for line in (b"EHLO x\r\n", b"MAIL FROM:<a@example.org>\r\n", f"RCPT TO:<{HUB}>\r\n".encode(),
                 b"DATA\r\n", b"From: a@example.org\r\n\r\nhalf a mess"):
        f.write(line)
        f.flush()
    time.sleep(0.2)
    sock.close()
    still_serves(served)


def test_commands_out_of_order_and_unknown(served: Instance) -> None:
    with smtplib.SMTP("127.0.0.1", served.inbound_port, timeout=30) as s:
        s.ehlo()
        code, text = s.docmd("RCPT TO:<x@medvoyage.example>")
        assert code == 503 and text.startswith(b"5.5.1")
        code, text = s.docmd("DATA")
        assert code == 503 and text.startswith(b"5.5.1")
        code, text = s.docmd("FROBNICATE")
        assert code == 500 and text.startswith(b"5.5.1")
    still_serves(served)


def test_auth_unknown_mechanism_wrong_password_and_throttle(served: Instance) -> None:
    with smtplib.SMTP("127.0.0.1", served.submission_port, timeout=60) as s:
        s.starttls(context=tls())
        s.ehlo()
        code, text = s.docmd("AUTH", "CRAM-SHA512")
        assert code == 504 and text.startswith(b"5.5.4")
        bad = base64.b64encode(f"\0{COORD}\0wrong".encode()).decode()
        for _ in range(3):
            code, text = s.docmd("AUTH", f"PLAIN {bad}")
            assert code == 535 and text.startswith(b"5.7.8")
        started = time.monotonic()
        code, _ = s.docmd("AUTH", f"PLAIN {bad}")
        assert code == 535
        slowed = time.monotonic() - started
        good = base64.b64encode(f"\0{COORD}\0{PASSWORD}".encode()).decode()
        # the right password still works after the delay
        code, _ = s.docmd("AUTH", f"PLAIN {good}")
        assert code == 235
    # slowed down by the throttle (a behaviour check, not a performance assertion)
    assert slowed >= 0.9
    still_serves(served)


def test_parallel_connections_do_not_multiply_guesses(served: Instance) -> None:
    """Past the free failures, AUTHs from one address take turns across connections: three
    sent at once are answered a step apart, not all after one step."""
    bad = base64.b64encode(f"\0{COORD}\0wrong".encode()).decode()

    def connect() -> smtplib.SMTP:
        s = smtplib.SMTP("127.0.0.1", served.submission_port, timeout=60)
        s.starttls(context=tls())
        s.ehlo()
        return s

    first = connect()
    for _ in range(3):
        assert first.docmd("AUTH", f"PLAIN {bad}")[0] == 535
    others = [connect() for _ in range(3)]
    try:
        started = time.monotonic()
        for s in others:
            s.send(f"AUTH PLAIN {bad}\r\n".encode())
        answered = []
        for s in others:
            assert s.getreply()[0] == 535
            answered.append(time.monotonic() - started)
        good = base64.b64encode(f"\0{COORD}\0{PASSWORD}".encode()).decode()
        assert first.docmd("AUTH", f"PLAIN {good}")[0] == 235  # and the count is cleared
    finally:
        for s in [first, *others]:
            s.close()
    # turns one, two and three steps (of 1 s) away: a behaviour check, not a timing one
    assert max(answered) >= 2.5
    still_serves(served)


def test_submission_sender_must_be_ours_and_recipient_valid(served: Instance) -> None:
    with smtplib.SMTP("127.0.0.1", served.submission_port, timeout=30) as s:
        s.starttls(context=tls())
        s.login(COORD, PASSWORD)
        code, text = s.mail("someone@gmail.example")
        assert code == 553 and text.startswith(b"5.7.1")
        assert s.mail(COORD)[0] == 250
        code, text = s.rcpt("not an address")
        assert code in (501, 553)


def test_addresses_that_break_the_email_parser(served: Instance,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """``<`` and ``a@`` make the email package's address parser raise (IndexError): a
    malformed-address reply, not a traceback."""
    caplog.set_level(logging.INFO)
    with smtplib.SMTP("127.0.0.1", served.inbound_port, timeout=30) as s:
        s.ehlo()
        for address in ("<", "a@", '"'):
            code, text = s.docmd(f"MAIL FROM:{address}")
            assert (code, text[:6]) == (553, b"5.1.3 "), (address, code, text)
            code, text = s.docmd(f"VRFY {address}")
            assert (code, text[:6]) == (502, b"5.1.3 "), (address, code, text)
        assert s.mail("a@example.org")[0] == 250
        code, text = s.docmd("RCPT TO:a@")
        assert (code, text[:6]) == (553, b"5.1.3 "), (code, text)
    still_serves(served)
    assert_no_traceback(caplog)
