"""The delivery client against real servers on loopback: aiosmtpd (lock-step, no PIPELINING)
and a scripted server that pipelines, speaks STARTTLS and records every byte it receives."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from mailhub.deliver.smtp_client import SHUTTING_DOWN, Outgoing, SendResult, SmtpConnection
from tests.conftest import SinkHandler
from tests.deliver.smtp_double import SmtpDouble, TlsFiles, make_tls_files, serve, unstuff

SENDER, RCPT = "coord@medvoyage.example", "records@clinic-a.example"

# (what the hub hands the client, what must arrive after dot-unstuffing)
BODIES = [
    (b"Subject: plain\r\n\r\nline one\r\nline two\r\n", None),
    (b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n", None),
    (b".first line is a dot line\r\nx\r\n", None),
    (b"Subject: no final line end\r\n\r\nlast line", b"Subject: no final line end\r\n\r\nlast line\r\n"),
    (b"Subject: 8bit\r\n\r\nGr\xc3\xbc\xc3\x9fe, se\xf1or \xff\r\n", None),
    (b"Subject: bare\n\n.dot after LF\nCR only\rend\r\n", b"Subject: bare\r\n\r\n.dot after LF\r\nCR only\r\nend\r\n"),
    (b"", b"\r\n"),
]


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def conn_to(server: SmtpDouble, **options: object) -> SmtpConnection:
    return SmtpConnection("127.0.0.1", server.port, timeout=10, **options)  # type: ignore[arg-type]


def send_once(server: SmtpDouble) -> SendResult:
    """One message on a new connection, closed after (QUIT)."""
    conn = conn_to(server)
    try:
        return conn.send(SENDER, RCPT, b"x\r\n")
    finally:
        conn.close()


def test_lockstep_to_aiosmtpd_byte_exact(sink: tuple[SinkHandler, int]) -> None:
    handler, port = sink
    conn = SmtpConnection("127.0.0.1", port, timeout=10)
    try:
        for data, _ in BODIES:
            assert conn.send(SENDER, RCPT, data).ok
        assert not conn.pipelining  # aiosmtpd does not advertise it: lock-step was used
        handler.refuse["gone@clinic-a.example"] = "550 5.1.1 no such mailbox"
        handler.refuse["busy@clinic-a.example"] = "450 4.2.1 try later"
        gone = conn.send(SENDER, "gone@clinic-a.example", b"x\r\n")
        busy = conn.send(SENDER, "busy@clinic-a.example", b"x\r\n")
        assert conn.send(SENDER, RCPT, b"after the refusals\r\n").ok  # RSET left it usable
    finally:
        conn.close()
    assert (gone.ok, gone.permanent, gone.reply) == (False, True, "550 5.1.1 no such mailbox")
    assert (busy.ok, busy.permanent, busy.reply) == (False, False, "450 4.2.1 try later")
    got = handler.wait_for(len(BODIES) + 1)
    assert [m.content for m in got[:len(BODIES)]] == [want or data for data, want in BODIES]
    assert got[-1].content == b"after the refusals\r\n"
    assert all(m.mail_from == SENDER and m.rcpt_tos == [RCPT] for m in got)


def test_pipelined_group_and_exact_wire(servers: list[SmtpDouble]) -> None:
    # replies held until DATA: only a client that sends MAIL, RCPT and DATA together gets on
    server = serve(servers, hold_until_data=True)
    conn = conn_to(server)
    try:
        for data, _ in BODIES:
            result = conn.send(SENDER, RCPT, data)
            assert result.ok and result.reply == "250 accepted"
        assert conn.pipelining
    finally:
        conn.close()
    assert server.connections == 1
    assert len(server.transactions) == len(BODIES)
    for tx, (data, want) in zip(server.transactions, BODIES, strict=True):
        assert tx.commands == [f"MAIL FROM:<{SENDER}> SIZE={len(data)}\r\n".encode(),
                               f"RCPT TO:<{RCPT}>\r\n".encode(), b"DATA\r\n"]
        assert tx.body is not None and unstuff(tx.body) == (want or data)
    dots = server.transactions[1].body
    assert dots == b"Subject: dots\r\n\r\n..leading dot\r\n...two dots\r\n..\r\nend\r\n"
    assert server.transactions[2].body == b"..first line is a dot line\r\nx\r\n"
    assert server.verbs()[-1] == "QUIT"


@pytest.mark.parametrize("reply,permanent", [("550 5.1.1 no such mailbox", True),
                                             ("451 4.3.0 greylisted, try later", False)])
def test_refused_rcpt_then_rset(servers: list[SmtpDouble], reply: str, permanent: bool) -> None:
    server = serve(servers, rcpt_replies={"gone@clinic-a.example": reply})
    conn = conn_to(server)
    try:
        result = conn.send(SENDER, "gone@clinic-a.example", b"secret body\r\n")
        assert conn.send(SENDER, RCPT, b"next\r\n").ok
    finally:
        conn.close()
    assert (result.ok, result.permanent, result.reply) == (False, permanent, reply)
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "DATA", "RSET",
                              "MAIL", "RCPT", "DATA", "QUIT"]
    assert len(server.transactions) == 1 and server.transactions[0].body == b"next\r\n"
    assert server.connections == 1


def test_refused_mail_reports_mail_reply(servers: list[SmtpDouble]) -> None:
    server = serve(servers, mail_reply="553 5.1.8 sender domain unknown")
    result = send_once(server)
    assert (result.ok, result.permanent) == (False, True)
    assert result.reply == "553 5.1.8 sender domain unknown"  # not the 554 that DATA got
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "DATA", "RSET", "QUIT"]
    assert server.transactions == []


@pytest.mark.parametrize("pipelining", [True, False])
def test_refused_data_command(servers: list[SmtpDouble], pipelining: bool) -> None:
    server = serve(servers, pipelining=pipelining, data_reply="554 5.3.0 not now")
    result = send_once(server)
    assert (result.ok, result.permanent, result.reply) == (False, True, "554 5.3.0 not now")
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "DATA", "RSET", "QUIT"]


@pytest.mark.parametrize("final,permanent", [("552 5.3.4 message too big", True),
                                             ("451 4.3.0 local error", False)])
def test_refused_after_body(servers: list[SmtpDouble], final: str, permanent: bool) -> None:
    server = serve(servers, final_reply=final)
    result = send_once(server)
    assert (result.ok, result.permanent, result.reply) == (False, permanent, final)
    assert server.verbs()[-2:] == ["RSET", "QUIT"]


def test_data_accepted_after_refused_rcpt_gets_empty_end(servers: list[SmtpDouble]) -> None:
    server = serve(servers, rcpt_replies={RCPT: "550 5.1.1 unknown"}, data_reply="354 go on")
    conn = conn_to(server)
    try:
        result = conn.send(SENDER, RCPT, b"must not be sent\r\n")
    finally:
        conn.close()
    assert result.reply == "550 5.1.1 unknown" and result.permanent
    assert [tx.body for tx in server.transactions] == [b""]  # "." alone: no content left
    assert server.verbs()[-2:] == ["RSET", "QUIT"]


def test_421_closes_instead_of_rset(servers: list[SmtpDouble]) -> None:
    server = serve(servers, mail_reply="421 4.3.2 shutting down")
    conn = conn_to(server)
    result = conn.send(SENDER, RCPT, b"x\r\n")
    conn.close()
    assert (result.ok, result.permanent, result.reply) == (False, False, "421 4.3.2 shutting down")
    assert "RSET" not in server.verbs() and "QUIT" not in server.verbs()


def test_multiline_replies(servers: list[SmtpDouble]) -> None:
    server = serve(servers, mail_reply="250-2.1.0 first\r\n250-2.1.0 second\r\n250 2.1.0 ok",
                   rcpt_replies={"gone@clinic-a.example":
                                 "550-5.1.1 no such mailbox\r\n550 5.1.1 see the directory"})
    conn = conn_to(server)
    try:
        result = conn.send(SENDER, "gone@clinic-a.example", b"x\r\n")
        assert conn.send(SENDER, RCPT, b"y\r\n").ok  # replies stayed in step
    finally:
        conn.close()
    assert result.reply == "550 5.1.1 no such mailbox\n5.1.1 see the directory"
    assert result.permanent


@pytest.mark.parametrize("drop_at", ["MAIL", "."])
def test_reconnects_once_after_a_drop(servers: list[SmtpDouble], drop_at: str) -> None:
    server = serve(servers, drop_at=drop_at, drops=1)
    result = send_once(server)
    assert result.ok
    assert server.connections == 2 and len(server.transactions) == 1


@pytest.mark.parametrize("chained", [False, True])
def test_a_slow_reply_to_the_data_is_waited_for(servers: list[SmtpDouble], chained: bool) -> None:
    """A next hop scanning a message may answer its data after the usual timeout: that reply
    is waited for (RFC 5321's ten minutes), not given up on and the message sent again."""
    server = serve(servers, final_delay=1.0)
    conn = SmtpConnection("127.0.0.1", server.port, timeout=0.3, final_timeout=30)
    try:
        if chained:
            results = conn.send_many([Outgoing(SENDER, RCPT, b"x\r\n"),
                                      Outgoing(SENDER, RCPT, b"y\r\n")])
        else:
            results = [conn.send(SENDER, RCPT, b"x\r\n")]
    finally:
        conn.close()
    assert [r.ok for r in results] == [True] * len(results)
    assert server.connections == 1 and len(server.transactions) == len(results)


def test_a_send_cut_off_at_shutdown_is_not_made_again(servers: list[SmtpDouble]) -> None:
    server = serve(servers, final_delay=-1)  # takes the data, never answers
    abort = threading.Event()
    conn = SmtpConnection("127.0.0.1", server.port, timeout=10, abort=abort)
    got: list[SendResult] = []
    sender = threading.Thread(target=lambda: got.append(conn.send(SENDER, RCPT, b"x\r\n")))
    sender.start()
    while not server.transactions and sender.is_alive():
        time.sleep(0.01)
    abort.set()
    conn.cut_off()
    sender.join(10)
    assert not sender.is_alive()
    assert got == [SHUTTING_DOWN] and not got[0].permanent
    assert server.connections == 1 and len(server.transactions) == 1
    assert conn.send(SENDER, RCPT, b"y\r\n") == SHUTTING_DOWN and server.connections == 1


def test_drop_twice_is_a_temporary_failure(servers: list[SmtpDouble]) -> None:
    server = serve(servers, drop_at="MAIL", drops=-1)
    result = send_once(server)
    assert not result.ok and not result.permanent
    assert result.reply.startswith(f"connection to 127.0.0.1:{server.port} lost")
    assert server.connections == 2 and server.transactions == []


def test_unreachable_is_temporary() -> None:
    from tests.conftest import free_port

    result = SmtpConnection("127.0.0.1", free_port(), timeout=5).send(SENDER, RCPT, b"x\r\n")
    assert not result.ok and not result.permanent and "cannot connect" in result.reply


def test_starttls_required_checks_the_certificate(servers: list[SmtpDouble],
                                                  tls_files: TlsFiles) -> None:
    server = serve(servers, tls=tls_files.server_context())
    bad = conn_to(server, starttls="required", ca_file=tls_files.other_ca)
    refused = bad.send(SENDER, RCPT, b"x\r\n")
    bad.close()
    assert not refused.ok and not refused.permanent and "cannot connect" in refused.reply
    assert "MAIL" not in server.verbs()
    good = conn_to(server, starttls="required", ca_file=tls_files.ca)
    try:
        assert good.send(SENDER, RCPT, b"x\r\n", require_tls=True).ok
    finally:
        good.close()
    assert [tx.tls for tx in server.transactions] == [True]


def test_opportunistic_tls_without_certificate_checks(servers: list[SmtpDouble],
                                                      tls_files: TlsFiles) -> None:
    server = serve(servers, tls=tls_files.server_context())
    conn = conn_to(server)  # opportunistic: the test CA is unknown, TLS is used anyway
    try:
        assert conn.send(SENDER, RCPT, b"x\r\n", require_tls=True).ok
    finally:
        conn.close()
    assert [tx.tls for tx in server.transactions] == [True]


def test_starttls_required_but_not_offered(servers: list[SmtpDouble]) -> None:
    server = serve(servers)
    conn = conn_to(server, starttls="required")
    result = conn.send(SENDER, RCPT, b"x\r\n")
    conn.close()
    assert not result.ok and not result.permanent and "does not offer STARTTLS" in result.reply
    assert "MAIL" not in server.verbs()


@pytest.mark.parametrize("with_tls", [False, True])
def test_require_tls_never_over_plaintext(servers: list[SmtpDouble], tls_files: TlsFiles,
                                          with_tls: bool) -> None:
    # no TLS offered; or offered but [delivery].starttls = "off"
    server = serve(servers, tls=tls_files.server_context() if with_tls else None)
    conn = conn_to(server, starttls="off" if with_tls else "opportunistic")
    try:
        result = conn.send(SENDER, RCPT, b"plaintext exception\r\n", require_tls=True)
        assert conn.send(SENDER, RCPT, b"ordinary\r\n").ok
    finally:
        conn.close()
    assert not result.ok and not result.permanent and "offered no TLS" in result.reply
    assert [tx.body for tx in server.transactions] == [b"ordinary\r\n"]
    assert "STAR" not in server.verbs()


def test_smtputf8_when_needed(servers: list[SmtpDouble]) -> None:
    server = serve(servers)
    conn = conn_to(server)
    try:
        assert conn.send("koordinátor@medvoyage.example", RCPT, b"x\r\n", smtputf8=True).ok
    finally:
        conn.close()
    assert server.transactions[0].commands[0] == (
        "MAIL FROM:<koordinátor@medvoyage.example> SIZE=3 SMTPUTF8\r\n".encode())


def test_smtputf8_needed_but_not_offered(servers: list[SmtpDouble]) -> None:
    server = serve(servers, smtputf8=False)
    conn = conn_to(server)
    try:
        result = conn.send("koordinátor@medvoyage.example", RCPT, b"x\r\n", smtputf8=True)
        assert conn.send(SENDER, RCPT, b"y\r\n").ok
    finally:
        conn.close()
    assert not result.ok and not result.permanent and "SMTPUTF8" in result.reply
    assert [tx.body for tx in server.transactions] == [b"y\r\n"]
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]


def test_quit_on_close(servers: list[SmtpDouble]) -> None:
    server = serve(servers)
    conn = conn_to(server)
    assert conn.send(SENDER, RCPT, b"x\r\n").ok
    conn.close()
    conn.close()  # twice is harmless
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]


@pytest.mark.parametrize("tls", [False, True])
def test_no_nagle_delay_on_the_delivery_socket(servers: list[SmtpDouble], tls_files: TlsFiles,
                                               tls: bool) -> None:
    # a body leaves in one write and then we wait for the reply: Nagle's algorithm would hold
    # its last partial segment until the peer's delayed ACK
    server = serve(servers, tls=tls_files.server_context() if tls else None)
    conn = conn_to(server)
    try:
        assert conn.send(SENDER, RCPT, b"x\r\n").ok
        assert conn._tls is tls
        assert conn._sock is not None
        assert conn._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        conn.close()


class CountingSocket:
    """The connection's socket, counting writes: chained sending is one write a message."""

    def __init__(self, sock: object) -> None:
        self.sock, self.writes = sock, 0

    def sendall(self, data: bytes) -> None:
        self.writes += 1
        self.sock.sendall(data)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.sock, name)


def outgoing(n: int, **fields: object) -> list[Outgoing]:
    return [Outgoing(SENDER, RCPT, f"Subject: {i}\r\n\r\n.body {i}\r\n".encode(), **fields)  # type: ignore[arg-type]
            for i in range(n)]


def test_send_many_chains_body_and_next_envelope_in_one_write(servers: list[SmtpDouble]) -> None:
    # MAIL/RCPT replies held until DATA: each envelope still has to leave as one group
    server = serve(servers, hold_until_data=True)
    conn = conn_to(server)
    try:
        assert conn.send(SENDER, RCPT, b"warm\r\n").ok  # the connection is up
        counter = CountingSocket(conn._sock)
        conn._sock = counter  # type: ignore[assignment]
        results = conn.send_many(outgoing(4))
        writes = counter.writes
    finally:
        conn.close()
    assert [r.ok for r in results] == [True] * 4
    assert writes == 1 + 4  # the first envelope, then body + next envelope each
    assert server.connections == 1
    assert [unstuff(tx.body or b"") for tx in server.transactions[1:]] == [
        f"Subject: {i}\r\n\r\n.body {i}\r\n".encode() for i in range(4)]
    assert server.verbs() == ["EHLO"] + ["MAIL", "RCPT", "DATA"] * 5 + ["QUIT"]


def test_send_many_refused_recipient_mid_chain(servers: list[SmtpDouble]) -> None:
    server = serve(servers, rcpt_replies={"gone@clinic-a.example": "550 5.1.1 no such user"})
    conn = conn_to(server)
    items = outgoing(3)
    items[1] = Outgoing(SENDER, "gone@clinic-a.example", b"secret\r\n")
    try:
        assert conn.send(SENDER, RCPT, b"warm\r\n").ok
        results = conn.send_many(items)
    finally:
        conn.close()
    assert [(r.ok, r.permanent, r.reply) for r in results] == [
        (True, False, "250 accepted"), (False, True, "550 5.1.1 no such user"),
        (True, False, "250 accepted")]
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "DATA", "MAIL", "RCPT", "DATA",
                              "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA", "QUIT"]
    assert [unstuff(tx.body or b"") for tx in server.transactions] == [
        b"warm\r\n", items[0].data, items[2].data]


def test_send_many_after_a_drop_mid_chain_sends_the_rest_once(servers: list[SmtpDouble]) -> None:
    # the connection hangs up after reading the third body (warm-up, first, second): the second
    # got no reply, so it and the third go again on a new connection, each exactly once
    server = serve(servers, drop_at=".", drops=1, drop_skip=2)
    conn = conn_to(server)
    try:
        assert conn.send(SENDER, RCPT, b"warm\r\n").ok
        results = conn.send_many(outgoing(3))
    finally:
        conn.close()
    assert [r.ok for r in results] == [True] * 3
    assert server.connections == 2
    assert [unstuff(tx.body or b"") for tx in server.transactions] == [b"warm\r\n"] + [
        f"Subject: {i}\r\n\r\n.body {i}\r\n".encode() for i in range(3)]


def test_send_many_without_pipelining_goes_one_by_one(servers: list[SmtpDouble]) -> None:
    server = serve(servers, pipelining=False)
    conn = conn_to(server)
    try:
        results = conn.send_many(outgoing(3))
    finally:
        conn.close()
    assert [r.ok for r in results] == [True] * 3
    assert len(server.transactions) == 3 and server.connections == 1


def test_send_many_never_sends_a_tls_only_message_in_the_clear(servers: list[SmtpDouble]) -> None:
    server = serve(servers)  # no STARTTLS offered
    conn = conn_to(server)
    items = outgoing(3)
    items[1] = Outgoing(SENDER, RCPT, b"plaintext exception\r\n", require_tls=True)
    try:
        assert conn.send(SENDER, RCPT, b"warm\r\n").ok
        results = conn.send_many(items)
    finally:
        conn.close()
    assert [r.ok for r in results] == [True, False, True]
    assert "offered no TLS" in results[1].reply
    assert b"plaintext exception\r\n" not in [tx.body for tx in server.transactions]
    assert len(server.transactions) == 3


@pytest.mark.parametrize("verb", ["RCPT", "."])
@pytest.mark.parametrize("huge", ["250 " + "x" * 100_000, "250-x\r\n" * 20_000 + "250 x"])
def test_an_unreadable_reply_is_a_temporary_failure(servers: list[SmtpDouble], verb: str,
                                                    huge: str) -> None:
    # a 100 KB reply line, or a reply of endless lines, is no answer from the server, least of
    # all a permanent refusal: tried again later, not bounced to its sender as undeliverable
    server = serve(servers, **({"rcpt_replies": {RCPT: huge}} if verb == "RCPT"
                               else {"final_reply": huge}))
    result = send_once(server)
    assert not result.ok and not result.permanent
    assert "reply too long to read" in result.reply
    assert len(result.reply) < 200


def test_a_garbage_reply_is_a_temporary_failure(servers: list[SmtpDouble]) -> None:
    server = serve(servers, final_reply="\x00\xff garbage \x1b[31m")
    result = send_once(server)
    assert not result.ok and not result.permanent
