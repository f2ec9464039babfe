"""The benchmark's client: replies read whole however they arrive, and a real load delivered.

The load runs against the bare aiosmtpd reference server in its own process, over STARTTLS and
AUTH PLAIN as in the benchmark, so every message the client counts as acknowledged is one the
server counted too.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from bench.client import ClientSession, run_load
from bench.loadgen import Item, ServerProcess, make_message
from mailhub.crypto.selfsigned import generate_tls_identity


def test_replies_are_read_whole_however_the_stream_is_cut() -> None:
    ours, theirs = socket.socketpair()
    stream = b"250-bench.host\r\n250-SIZE 1000\r\n250 HELP\r\n354 go ahead\r\n221 bye\r\n"

    def feed() -> None:  # one byte at a time: every cut, a CRLF split included
        for n in range(len(stream)):
            theirs.sendall(stream[n : n + 1])

    t = threading.Thread(target=feed)
    t.start()
    s = ClientSession(ours)
    try:
        assert s.reply() == (250, b"250-bench.host\r\n250-SIZE 1000\r\n250 HELP\r\n")
        assert s.reply() == (354, b"354 go ahead\r\n")
        assert s.reply() == (221, b"221 bye\r\n")
    finally:
        t.join()
        s.close()
        theirs.close()


def test_a_closed_connection_is_an_error_not_a_reply() -> None:
    ours, theirs = socket.socketpair()
    theirs.sendall(b"250-half a reply\r\n")
    theirs.close()
    s = ClientSession(ours)
    with pytest.raises(ConnectionError, match="closed"):
        s.reply()
    s.close()


@pytest.fixture
def bare_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    key_pem, cert_pem = generate_tls_identity(["localhost"])
    key, cert = tmp_path / "tls.key", tmp_path / "tls.crt"
    key.write_bytes(key_pem)
    key.chmod(0o600)
    cert.write_bytes(cert_pem)
    server = ServerProcess("bare", cert, key).start()
    yield server
    server.stop()


def test_a_load_over_starttls_is_delivered_once_per_message(bare_server: ServerProcess) -> None:
    items = [Item("r@clinic.example", f"<m{n}@hub.example>",
                  make_message(2048 if n % 2 else 70_000, f"<m{n}@hub.example>",
                               "c@hub.example", "r@clinic.example", n))
             for n in range(40)]
    started: list[int] = []
    result = run_load("127.0.0.1", bare_server.port, items, sessions=4, sender="c@hub.example",
                      login=("c@hub.example", "any"), tls=True,
                      on_start=lambda: started.append(bare_server.count))
    assert result.errors == [] and result.refused == []
    assert sorted(result.acked) == sorted(i.message_id for i in items)
    assert started == [0]  # every session authenticated before the first message
    assert bare_server.wait_count(40, timeout=30) >= result.started > 0
    assert result.client_cpu > 0


def test_a_server_that_is_not_there_is_reported_not_hung() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        result = run_load("127.0.0.1", port, [], sessions=3, sender="c@hub.example",
                          login=None, tls=False)
    assert len(result.errors) == 3 and all("Connection" in e for e in result.errors)
