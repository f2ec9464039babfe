"""Connection limits and the junk-command limit, on a real listener (and the counting rule)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailhub.ingress.smtp_limits import (
    JUNK_LIMIT,
    TOO_MANY,
    TOO_MANY_FROM_CLIENT,
    ConnectionLimits,
)
from tests.conftest import Instance, RunningHub, SinkHandler, make_instance


def test_limits_count_per_client_and_in_all() -> None:
    limits = ConnectionLimits(per_client=2, total=3)
    assert limits.admit("192.0.2.1") is None and limits.admit("192.0.2.1") is None
    assert limits.admit("192.0.2.1") == TOO_MANY_FROM_CLIENT
    assert limits.admit("192.0.2.2") is None
    assert limits.admit("192.0.2.3") == TOO_MANY  # three open in all
    limits.release("192.0.2.1")
    assert limits.admit("192.0.2.3") is None
    for client in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        limits.release(client)
    assert limits.admit("192.0.2.1") is None and limits.admit("192.0.2.1") is None


@pytest.fixture
def limited(short_tmp: Path, sink: tuple[SinkHandler, int]) -> Iterator[Instance]:
    inst = make_instance(short_tmp / "hub", sink[1],
                         **{"smtp.inbound.max_connections_per_client": "3"})
    hub = RunningHub(inst.config).start()
    try:
        yield inst
    finally:
        hub.stop()


class Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.file = self.sock.makefile("rb")

    def line(self) -> bytes:
        return self.file.readline()

    def command(self, text: str) -> bytes:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.line()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_a_client_over_its_connections_is_refused_and_others_go_on(limited: Instance) -> None:
    clients = [Client(limited.inbound_port) for _ in range(3)]
    try:
        assert [c.line()[:4] for c in clients] == [b"220 "] * 3
        extra = Client(limited.inbound_port)
        assert extra.line() == TOO_MANY_FROM_CLIENT
        assert extra.line() == b""  # and closed
        extra.close()
        clients.pop().close()
        again = Client(limited.inbound_port)  # a place came free
        clients.append(again)
        assert again.line()[:4] == b"220 "
        assert again.command("EHLO client.example")[:4] == b"250-"
    finally:
        for c in clients:
            c.close()


def test_commands_without_mail_end_the_connection(limited: Instance) -> None:
    client = Client(limited.inbound_port)
    try:
        assert client.line()[:4] == b"220 "
        assert client.command("HELO client.example")[:3] == b"250"
        for _ in range(JUNK_LIMIT - 1):
            assert client.command("NOOP")[:3] == b"250"
        # a message sent starts the count again
        assert client.command("MAIL FROM:<a@example.org>")[:3] == b"250"
        assert client.command("RCPT TO:<intake@medvoyage.example>")[:3] == b"250"
        assert client.command("DATA")[:3] == b"354"
        assert client.command("From: a@example.org\r\nSubject: hi\r\n\r\nhello\r\n.")[:3] == b"250"
        for _ in range(JUNK_LIMIT):
            assert client.command("RSET")[:3] == b"250"
        assert client.command("NOOP").startswith(b"421 4.7.0")
        assert client.line() == b""  # closed
    finally:
        client.close()
