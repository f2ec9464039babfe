"""HubSMTP's DATA over real sockets, side by side with stock aiosmtpd.

Both servers listen on loopback with the same handler type and limits; a raw socket client
sends the same bytes to each, cut into separate writes where a test needs a cut. HubSMTP must
answer what aiosmtpd answers (after ``rewrite_reply``) and hand the handler the same message.
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from mailhub.ingress.smtp_server import HubSMTP, rewrite_reply

LIMIT = 5000


@dataclass
class Keeper:
    """A handler that keeps what DATA hands it."""

    got: list[tuple[str, bytes]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.got.append((envelope.mail_from, envelope.original_content))
        return "250 2.0.0 kept"


@dataclass
class Listener:
    port: int
    handler: Keeper


class Servers:
    """HubSMTP and stock aiosmtpd on one event loop in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.hub = self._listen(HubSMTP)
        self.stock = self._listen(SMTP)

    def _listen(self, cls: type[SMTP]) -> Listener:
        handler = Keeper()

        async def start() -> asyncio.base_events.Server:
            return await self.loop.create_server(
                lambda: cls(handler, hostname="test", data_size_limit=LIMIT,
                            enable_SMTPUTF8=True, decode_data=False), "127.0.0.1", 0)

        server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        return Listener(server.sockets[0].getsockname()[1], handler)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    s = Servers()
    try:
        yield s
    finally:
        s.close()


class Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")
        assert self.reply().startswith("220")

    def reply(self) -> str:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("closed")
            lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
            if line[3:4] != b"-":
                return "\n".join(lines)

    def send(self, *pieces: bytes) -> None:
        for i, piece in enumerate(pieces):
            if i:
                time.sleep(0.03)  # a separate arrival
            self.sock.sendall(piece)

    def cmd(self, line: str) -> str:
        self.send(line.encode("utf-8") + b"\r\n")
        return self.reply()

    def start_data(self, mail: str = "MAIL FROM:<a@b.example>") -> None:
        assert self.cmd("EHLO client").startswith("250")
        assert self.cmd(mail).startswith("250")
        assert self.cmd("RCPT TO:<c@d.example>").startswith("250")
        assert self.cmd("DATA").startswith("354")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def exchange(port: int, pieces: list[bytes], replies: int = 1,
             mail: str = "MAIL FROM:<a@b.example>") -> list[str]:
    """DATA with ``pieces`` sent as separate writes; the replies that follow (pipelined ones)."""
    client = Client(port)
    try:
        client.start_data(mail)
        client.send(*pieces)
        return [client.reply() for _ in range(replies)]
    finally:
        client.close()


def both(servers: Servers, pieces: list[bytes], replies: int = 1,
         mail: str = "MAIL FROM:<a@b.example>") -> tuple[list[str], list[tuple[str, bytes]]]:
    """Run the same exchange on both servers; assert they agree; return HubSMTP's side."""
    before = len(servers.hub.handler.got), len(servers.stock.handler.got)
    hub = exchange(servers.hub.port, pieces, replies, mail)
    stock = exchange(servers.stock.port, pieces, replies, mail)
    assert hub == [rewrite_reply(r) for r in stock]
    hub_got = servers.hub.handler.got[before[0]:]
    assert hub_got == servers.stock.handler.got[before[1]:]
    return hub, hub_got


def test_end_marker_split_across_reads(servers: Servers) -> None:
    body = b"From: a@b.example\r\nSubject: split\r\n\r\nline\r\n"
    for cut in (b"", b"\r", b"\r\n", b"\r\n.", b"\r\n.\r"):
        replies, got = both(servers, [body[:-2] + cut, (body[-2:] + b".\r\n")[len(cut):]])
        assert replies[0].startswith("250 2.0.0") and got == [("a@b.example", body)]


def test_dot_stuffed_lines(servers: Servers) -> None:
    sent = b"..From: a@b.example\r\n\r\n..\r\n...dots\r\n.x\r\n.\r\n"
    replies, got = both(servers, [sent])
    assert got[0][1] == b".From: a@b.example\r\n\r\n.\r\n..dots\r\nx\r\n"


def body_of(size: int) -> bytes:
    head = b"From: a@b.example\r\n\r\n"
    filler = size - len(head)
    lines, rest = divmod(filler, 100)
    body = head + b"y" * (rest - 2) + b"\r\n" + (b"x" * 98 + b"\r\n") * lines
    assert len(body) == size
    return body


def test_size_limit_exact_and_one_byte_over_then_the_session_goes_on(servers: Servers) -> None:
    replies, got = both(servers, [body_of(LIMIT) + b".\r\n"])
    assert replies[0].startswith("250") and got[0][1] == body_of(LIMIT)
    over = body_of(LIMIT + 1) + b".\r\nMAIL FROM:<a@b.example>\r\nRSET\r\n"
    replies, got = both(servers, [over[:3000], over[3000:]], replies=3)
    assert replies[0].startswith("552 5.3.4 ") and got == []
    assert replies[1].startswith("250") and replies[2].startswith("250")


def test_line_over_the_length_limit(servers: Servers) -> None:
    sent = b"From: a@b.example\r\nX-Long: " + b"a" * 1200 + b"\r\n\r\nbody\r\n.\r\nNOOP\r\n"
    replies, got = both(servers, [sent], replies=2)
    assert replies[0].startswith("500 5.5.2 Line too long") and got == []
    assert replies[1].startswith("250")


def test_bare_lf_line_endings_kept_as_aiosmtpd_does(servers: Servers) -> None:
    sent = b"From: a@b.example\n\nline\n.\n..x\nlast\r\n.\r\n"
    replies, got = both(servers, [sent])
    assert got[0][1] == b"From: a@b.example\n\nline\n.\n..x\nlast\r\n"


def test_eight_bit_body_and_smtputf8_sender(servers: Servers) -> None:
    sent = b"From: a@b.example\r\nSubject: caf\xc3\xa9\r\n\r\n\xff\xfe raw\r\n.\r\n"
    replies, got = both(servers, [sent], mail="MAIL FROM:<a@b.example> BODY=8BITMIME")
    assert got[0][1] == sent[:-3]
    replies, got = both(servers, [sent], mail="MAIL FROM:<\u00e9t\u00e9@b.example> SMTPUTF8")
    assert got[0][0] == "\u00e9t\u00e9@b.example"


def test_pipelined_commands_after_the_end_in_the_same_packet(servers: Servers) -> None:
    sent = (b"From: a@b.example\r\n\r\none\r\n.\r\nMAIL FROM:<a@b.example>\r\n"
            b"RCPT TO:<c@d.example>\r\nDATA\r\n")
    replies, got = both(servers, [sent], replies=4)
    assert [r[:3] for r in replies] == ["250", "250", "250", "354"]
    assert len(got) == 1


def test_client_closing_mid_data_leaves_nothing(servers: Servers) -> None:
    before = len(servers.hub.handler.got)
    client = Client(servers.hub.port)
    client.start_data()
    client.send(b"From: a@b.example\r\n\r\nhalf a mess", b"age\r\n.")
    client.close()
    time.sleep(0.2)
    assert len(servers.hub.handler.got) == before
    replies, got = both(servers, [b"From: a@b.example\r\n\r\nwhole\r\n.\r\n"])
    assert replies[0].startswith("250") and len(got) == 1


def test_random_bodies_same_as_aiosmtpd(servers: Servers) -> None:
    rnd = random.Random(1869)
    tokens = [b"a", b".", b"..", b"\r\n", b"\n", b"\r", b"\r\n.", b"x" * 400, b"y" * 1100,
              b"\xe9", b" "]
    for _ in range(25):
        body = b"".join(rnd.choice(tokens) for _ in range(rnd.randint(0, 30)))
        sent = body + b"\r\n.\r\nNOOP\r\n"
        cut = rnd.randint(1, len(sent) - 1)
        both(servers, [sent[:cut], sent[cut:]], replies=2)


def test_help_and_out_of_order_data_as_aiosmtpd(servers: Servers) -> None:
    answers = []
    for listener in (servers.hub, servers.stock):
        client = Client(listener.port)
        try:
            answers.append([client.cmd(c) for c in ("DATA", "EHLO c", "HELP", "HELP DATA",
                                                     "HELP AUTH", "DATA", "MAIL FROM:<a@b.c>",
                                                     "DATA", "DATA x")])
        finally:
            client.close()
    hub, stock = answers
    assert hub == [rewrite_reply(r) for r in stock]
    assert hub[3] == "250 2.0.0 Syntax: DATA"  # HELP reads the syntax from our smtp_DATA
