"""The benchmark's SMTP client: blocking sockets, one thread per session, TLS inside OpenSSL.

It stands for the coordinators' mail clients, which in real use run on other machines. Here it
shares the two cores with what is measured, so like the sink (``bench/sink.py``) it is written
for low CPU: a blocking ``SSLSocket`` per session does its TLS records in C, where asyncio's
streams did them in Python (``sslproto``) and woke the loop for every reply. The relay uses
both cores and pays for every microsecond the client spends; the bare aiosmtpd reference runs
in one process and does not, so a costly client understated the relay's ratios.
"""

from __future__ import annotations

import base64
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.loadgen import CRLF, Item


@dataclass
class LoadResult:
    """What a load did: acknowledged message ids, refusals, errors, and its clock and CPU."""

    acked: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    started: float = 0.0
    last_ack: float = 0.0
    client_cpu: float = 0.0


def client_tls() -> ssl.SSLContext:
    """The load's TLS: the hub's certificate is self-signed, and not what is measured."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class ClientSession:
    """One SMTP session over a blocking socket; replies are read whole (multi-line too)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def reply(self) -> tuple[int, bytes]:
        """The next reply: (code, its lines)."""
        start = 0
        while True:
            end = self.buf.find(CRLF, start)
            if end < 0:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("server closed the connection")
                self.buf += data
                continue
            line = self.buf[start:end]
            start = end + 2
            if line[3:4] != b"-":
                text, self.buf = self.buf[:start], self.buf[start:]
                return int(line[:3]), text

    def cmd(self, line: bytes) -> tuple[int, bytes]:
        self.sock.sendall(line + CRLF)
        return self.reply()

    def close(self) -> None:
        self.sock.close()


def open_session(host: str, port: int, *, login: tuple[str, str] | None,
                 tls: bool) -> ClientSession:
    """Connect, EHLO, STARTTLS and AUTH PLAIN: a session ready for MAIL."""
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as asyncio's transports do
    s = ClientSession(sock)
    try:
        s.reply()
        s.cmd(b"EHLO bench.client")
        if tls:
            code, _ = s.cmd(b"STARTTLS")
            if code != 220:
                raise ConnectionError(f"STARTTLS refused: {code}")
            if s.buf:
                raise ConnectionError("the server sent data after 220 to STARTTLS")
            s.sock = client_tls().wrap_socket(sock)
            s.cmd(b"EHLO bench.client")
        if login:
            token = base64.b64encode(f"\0{login[0]}\0{login[1]}".encode()).decode()
            code, text = s.cmd(f"AUTH PLAIN {token}".encode())
            if code != 235:
                raise ConnectionError(f"AUTH refused: {text!r}")
    except BaseException:
        s.close()
        raise
    return s


def send_items(s: ClientSession, todo: list[Item], result: LoadResult, sender: str) -> None:
    """Take items from ``todo`` until none is left; each MAIL, RCPT and DATA waits for its
    reply (aiosmtpd does not offer PIPELINING)."""
    mail = f"MAIL FROM:<{sender}>".encode()
    while True:
        try:
            item = todo.pop()
        except IndexError:
            break
        code, text = s.cmd(mail)
        if code == 250:
            code, text = s.cmd(f"RCPT TO:<{item.rcpt}>".encode())
        if code == 250:
            code, text = s.cmd(b"DATA")
        if code == 354:
            s.sock.sendall(item.data + b".\r\n")
            code, text = s.reply()
            if code == 250:
                result.acked.append(item.message_id)
                result.last_ack = time.perf_counter()
                continue
        result.refused.append((item.message_id, text.decode("utf-8", "replace")))
        s.cmd(b"RSET")
    s.cmd(b"QUIT")


def run_load(host: str, port: int, items: list[Item], *, sessions: int, sender: str,
             login: tuple[str, str] | None, tls: bool,
             on_start: Callable[[], None] | None = None) -> LoadResult:
    """Send every item over ``sessions`` concurrent sessions (each reused for many messages).

    The clock starts once every session has done its STARTTLS and AUTH (a steady state: the
    set-up of a session is not what is compared), and so does the client's CPU count (every
    thread of this process); ``on_start`` is called then, for the caller to start counting the
    server's. (Eight scrypt checks cost the server about 0.8 s: 1.3 ms a message in a
    600-message run.)"""
    result = LoadResult()
    todo = list(reversed(items))
    cpu0 = [time.process_time()]

    def started() -> None:
        if on_start is not None:
            on_start()
        cpu0[0] = time.process_time()
        result.started = time.perf_counter()

    gate = threading.Barrier(sessions, action=started)

    def session() -> None:
        s: ClientSession | None = None
        try:
            try:
                s = open_session(host, port, login=login, tls=tls)
            finally:
                gate.wait()  # a session that failed to open must not hold the others back
            send_items(s, todo, result, sender)
        except BaseException as exc:  # reported with the result, as the caller expects
            result.errors.append(repr(exc))
        finally:
            if s is not None:
                s.close()

    threads = [threading.Thread(target=session, name=f"bench-client-{n}", daemon=True)
               for n in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.client_cpu = time.process_time() - cpu0[0]
    return result
