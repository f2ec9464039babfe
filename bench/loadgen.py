"""SMTP load for the benchmark: the messages, and the sink and bare aiosmtpd server processes.

The client that sends the load is in ``bench/client.py``, the sink in ``bench/sink.py``: both
are written for low CPU, since they share the machine with what is measured.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import socket
import ssl
import time
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path

from bench.sink import sink_main

CRLF = b"\r\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_message(size: int, message_id: str, sender: str, rcpt: str, seq: int = 0) -> bytes:
    """A plain text message of about ``size`` bytes (CRLF, no line starting with a dot)."""
    head = (f"From: Coordinator <{sender}>\r\nTo: <{rcpt}>\r\nSubject: bench {seq} pre-op notes\r\n"
            f"Date: Mon, 05 Jan 2026 10:00:00 +0000\r\nMessage-ID: {message_id}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n"
            "Content-Transfer-Encoding: 7bit\r\n\r\n").encode()
    line = b"Patient notes: Hb 13.2, INR 1.0, no known allergies, fit for travel. xxxxxx" + CRLF
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


@dataclass
class Item:
    rcpt: str
    message_id: str
    data: bytes  # CRLF, already dot-stuffed where needed


# --- the bare aiosmtpd reference server, in its own process ----------------------------------

def _bare_main(port: int, counter: Synchronized, cert: str, key: str) -> None:  # type: ignore[type-arg]
    import logging

    from aiosmtpd.smtp import SMTP, AuthResult

    logging.getLogger("mail.log").setLevel(logging.ERROR)  # a deprecation line on every AUTH
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)

    class Discard:
        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            with counter.get_lock():
                counter.value += 1
            return "250 2.0.0 discarded"

    def accept_any(*_: object) -> AuthResult:
        return AuthResult(success=True)

    handler = Discard()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="bare", tls_context=ctx, require_starttls=False,
                         auth_required=True, auth_require_tls=True, authenticator=accept_any,
                         decode_data=False, data_size_limit=100 * 1024 * 1024),
            "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


class ServerProcess:
    """A sink or bare aiosmtpd server in a child process, with a shared message counter."""

    def __init__(self, kind: str, cert: Path, key: Path, port: int | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.port = port or free_port()
        self.counter: Synchronized = ctx.Value("q", 0)  # type: ignore[type-arg]
        target = sink_main if kind == "sink" else _bare_main
        self.proc = ctx.Process(target=target, args=(self.port, self.counter, str(cert), str(key)),
                                daemon=True)

    def start(self) -> ServerProcess:
        self.proc.start()
        wait_port(self.port)
        return self

    @property
    def count(self) -> int:
        return int(self.counter.value)

    def wait_count(self, target: int, timeout: float = 600) -> float:
        """Wait until the counter reaches ``target``; returns the perf_counter time it did."""
        end = time.monotonic() + timeout
        while self.count < target:
            if time.monotonic() > end:
                raise TimeoutError(f"sink has {self.count} of {target} messages")
            time.sleep(0.002)
        return time.perf_counter()

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid or 0)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.join(10)


def wait_port(port: int, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


def proc_cpu(pid: int) -> float:
    """CPU seconds of a process and all its descendants (reaped children included)."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        ppid = int(fields[1])
        children.setdefault(ppid, []).append(int(entry))
        stats[int(entry)] = sum(int(f) for f in fields[11:15]) / tick
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += stats.get(p, 0.0)
        todo.extend(children.get(p, []))
    return total
