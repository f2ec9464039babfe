"""STARTTLS and AUTH on the submission listener, as the hub's log sees them.

A client that gives up on the TLS handshake is routine (an untrusted certificate, a client that
talks plaintext after 220): it must cost one log line naming the peer and the reason, never a
traceback, and the listener must go on serving. STARTTLS inside TLS is refused. A successful
AUTH logs nothing at WARNING. The hub serves in this process, so its records reach ``caplog``.
"""

from __future__ import annotations

import logging
import smtplib
import socket
import ssl
import time
from email.message import EmailMessage

import pytest

from tests.conftest import Instance
from tests.deliver.test_relay_e2e import COORD, PASSWORD


def no_verify() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def local_end(sock: socket.socket) -> str:
    """The client's address as the hub logs its peer."""
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def tls_failure_lines(caplog: pytest.LogCaptureFixture, peer: str,
                      timeout: float = 10.0) -> list[str]:
    """The hub's log lines about ``peer``'s failed handshake, once one has come (the server
    logs after the client has gone)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [r.getMessage() for r in caplog.records
                 if r.name == "mailhub.smtp" and peer in r.getMessage()]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def _earlier_loop_noise(record: logging.LogRecord) -> bool:
    """asyncio's note that a task was garbage-collected while pending: an earlier test's hub
    stopped its loop with a connection task open, and the collector got to it during this one
    (it names no exception and comes from no code path under test here)."""
    return record.name == "asyncio" and record.getMessage().startswith(
        "Task was destroyed but it is pending!") and not record.exc_info


def assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    bad = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.records
           if (r.exc_info or r.levelno >= logging.ERROR) and not _earlier_loop_noise(r)]
    assert bad == []
    assert "Traceback" not in caplog.text


def submit_one(inst: Instance) -> bytes:
    """A normal coordinator session: STARTTLS, AUTH, one message; the 250 reply's text."""
    msg = EmailMessage()
    msg["From"] = COORD
    msg["To"] = "desk@travel.example"
    msg["Subject"] = "after a failed handshake"
    msg.set_content("still served\n")
    with smtplib.SMTP("127.0.0.1", inst.submission_port, timeout=30) as s:
        s.starttls(context=no_verify())
        s.login(COORD, PASSWORD)
        s.mail(COORD)
        s.rcpt("desk@travel.example")
        code, text = s.data(msg.as_bytes())
    assert code == 250, text
    return text


def test_client_rejecting_the_certificate_costs_one_line(served: Instance,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    s = smtplib.SMTP("127.0.0.1", served.submission_port, timeout=30)
    peer = local_end(s.sock)
    with pytest.raises(ssl.SSLCertVerificationError):  # the hub's certificate is self-signed
        s.starttls(context=ssl.create_default_context())
    s.close()
    lines = tls_failure_lines(caplog, peer)
    assert len(lines) == 1, lines
    assert "TLS handshake failed" in lines[0] and "unknown ca" in lines[0].lower(), lines
    assert submit_one(served).startswith(b"2.0.0")
    assert_no_traceback(caplog)


def test_plaintext_after_220_costs_one_line(served: Instance,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with socket.create_connection(("127.0.0.1", served.submission_port), timeout=30) as sock:
        peer = local_end(sock)
        f = sock.makefile("rwb")
        f.readline()
        f.write(b"EHLO client.example\r\n")
        f.flush()
        while f.readline()[3:4] != b" ":
            pass
        f.write(b"STARTTLS\r\n")
        f.flush()
        assert f.readline().startswith(b"220 ")
        f.write(b"EHLO still talking in the clear\r\nMAIL FROM:<a@b.example>\r\n")
        f.flush()
        rest = f.read()  # until the server closes (a TLS alert at most; no SMTP reply)
    assert b"250" not in rest and b"\r\n" not in rest
    lines = tls_failure_lines(caplog, peer)
    assert len(lines) == 1, lines
    reason = lines[0].partition(f"peer={peer}: ")[2]
    assert "TLS handshake failed" in lines[0] and reason.strip(), lines
    assert submit_one(served).startswith(b"2.0.0")
    assert_no_traceback(caplog)


def test_starttls_inside_tls_refused(served: Instance, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with smtplib.SMTP("127.0.0.1", served.submission_port, timeout=30) as s:
        s.starttls(context=no_verify())
        s.ehlo()
        assert not s.has_extn("starttls")
        code, text = s.docmd("STARTTLS")
        assert (code, text[:6]) == (503, b"5.5.1 "), (code, text)
        # the session goes on in the TLS it has
        s.login(COORD, PASSWORD)
        assert s.noop()[0] == 250
    assert submit_one(served).startswith(b"2.0.0")
    assert_no_traceback(caplog)


def test_successful_auth_logs_no_warning(served: Instance,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with smtplib.SMTP("127.0.0.1", served.submission_port, timeout=30) as s:
        s.starttls(context=no_verify())
        assert s.login(COORD, PASSWORD)[0] == 235
        assert s.noop()[0] == 250
    deadline = time.monotonic() + 2  # the server's side of QUIT is logged after the reply
    while time.monotonic() < deadline and not any(
            "connection lost" in r.getMessage() for r in caplog.records):
        time.sleep(0.05)
    assert any(r.name == "mail.log" and "AUTH" in r.getMessage() for r in caplog.records)
    warned = [f"{r.name}: {r.getMessage()}" for r in caplog.records
              if r.levelno >= logging.WARNING]
    assert warned == []
