"""The delivery worker on a real SQLite queue against real loopback servers: claimed before the
first byte goes out, marked sent only after the 250, retries, failures and the DSN hook."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import pytest

from mailhub.deliver import queue
from mailhub.deliver.smtp_client import Outgoing, SendResult, SmtpConnection
from mailhub.store.models import utcnow
from tests.deliver.smtp_double import SmtpDouble, serve, unstuff
from tests.deliver.worker_support import Store, drain, make_worker


@pytest.mark.parametrize("commits", [True, False])
def test_claimed_before_sending_marked_sent_after_250(store: Store, servers: list[SmtpDouble],
                                                      caplog: pytest.LogCaptureFixture,
                                                      commits: bool) -> None:
    server = serve(servers, hold_until_data=True)
    bodies = [b"Subject: one\r\n\r\n.dot\r\n", b"two without line end", b"\xc3\xa9t\xc3\xa9\r\n"]
    ids = [store.enqueue(f"r{i}@clinic-a.example", body) for i, body in enumerate(bodies)]
    seen: list[tuple[str, bool]] = []

    def at_body() -> None:  # runs when the server has the body, before it answers 250
        row = store.row(ids[len(server.transactions) - 1])
        seen.append((row.status, row.sending_since is not None))

    server.on_data.append(at_body)
    worker = make_worker(store, server, commits=commits)
    with caplog.at_level(logging.INFO, logger="mailhub.deliver"):
        drain(worker)
    assert seen == [("queued", True)] * 3
    for item_id in ids:
        row = store.row(item_id)
        assert (row.status, row.reason, row.sending_since, row.attempts) == (
            "sent", "250 accepted", None, 1)
    got = sorted(server.transactions, key=lambda tx: tx.commands[1])
    assert [unstuff(tx.body or b"") for tx in got] == [
        bodies[0], b"two without line end\r\n", bodies[2]]
    sent_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sent ")]
    assert sorted(sent_lines) == sorted(
        f"sent queue_id={i} message_id=<m{n}@pc> to=r{n}@clinic-a.example relay=smarthost"
        for n, i in enumerate(ids))
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_temporary_refusal_is_retried_with_backoff(store: Store,
                                                   servers: list[SmtpDouble]) -> None:
    server = serve(servers, rcpt_replies={"busy@clinic-a.example": "451 4.3.0 try later"})
    item = store.enqueue("busy@clinic-a.example", b"x\r\n")
    before = utcnow()
    drain(make_worker(store, server))
    row = store.row(item)
    assert (row.status, row.reason, row.sending_since, row.attempts) == (
        "queued", "451 4.3.0 try later", None, 1)
    assert row.next_attempt_at >= before + timedelta(seconds=60)
    assert store.failed == [] and server.transactions == []
    assert server.verbs().count("RSET") == 1


def test_permanent_refusal_fails_and_notifies(store: Store, servers: list[SmtpDouble]) -> None:
    server = serve(servers, rcpt_replies={"gone@clinic-a.example": "550 5.1.1 no such user"})
    item = store.enqueue("gone@clinic-a.example", b"x\r\n")
    ok = store.enqueue("here@clinic-a.example", b"y\r\n")
    drain(make_worker(store, server))
    assert (store.row(item).status, store.row(item).reason) == ("failed", "550 5.1.1 no such user")
    assert store.failed == [(item, "550 5.1.1 no such user")]
    assert store.row(ok).status == "sent"


def test_a_failed_row_and_its_notice_commit_together(store: Store,
                                                    servers: list[SmtpDouble]) -> None:
    # the DSN cannot be written (here: it raises; in life a crash or a database error right
    # after the "failed" commit): the row must not end failed with its sender never told
    server = serve(servers, rcpt_replies={"gone@clinic-a.example": "550 5.1.1 no such user"})
    item = store.enqueue("gone@clinic-a.example", b"x\r\n")
    worker = make_worker(store, server)

    def broken(*_: object) -> None:
        raise OSError("no space left on device")

    worker.on_failed = broken
    drain(worker)
    row = store.row(item)
    assert (row.status, row.sending_since) == ("queued", None)  # tried again, notice and all
    queue.retry_all_now(store.engine)
    drain(make_worker(store, server))
    assert store.row(item).status == "failed"
    assert store.failed == [(item, "550 5.1.1 no such user")]


def test_a_row_without_payload_fails_with_a_notice(store: Store,
                                                   servers: list[SmtpDouble]) -> None:
    server = serve(servers)
    item = store.enqueue("r@clinic-a.example", b"", payload=False)
    drain(make_worker(store, server))
    assert store.failed == [(item, "payload missing")]


def test_gives_up_after_the_limit(store: Store, servers: list[SmtpDouble]) -> None:
    server = serve(servers, final_reply="452 4.3.1 out of storage")
    item = store.enqueue("r@clinic-a.example", b"x\r\n", created_at=utcnow() - timedelta(days=6))
    drain(make_worker(store, server))
    assert store.row(item).status == "failed"
    assert store.failed == [(item, "452 4.3.1 out of storage")]


def test_missing_payload_fails(store: Store, servers: list[SmtpDouble]) -> None:
    server = serve(servers)
    item = store.enqueue("r@clinic-a.example", b"", payload=False)
    drain(make_worker(store, server))
    assert (store.row(item).status, store.row(item).reason) == ("failed", "payload missing")
    assert server.connections == 0


def test_a_payload_file_that_cannot_be_read_delays_only_its_row(
        store: Store, servers: list[SmtpDouble], caplog: pytest.LogCaptureFixture) -> None:
    """A damaged segment (here: deleted) must not fail the claim of the rows around it: its
    row is retried later like any internal error, the others are sent."""
    from mailhub.deliver.payload_files import PayloadFiles

    server = serve(servers)
    store.files = PayloadFiles(store.root / "payloads", inline_max=300, limit=1)
    big = [store.enqueue(f"r{i}@clinic-a.example", b"Subject: x\r\n\r\n" + b"y" * 500)
           for i in range(3)]
    small = store.enqueue("s@clinic-a.example", b"Subject: s\r\n\r\nshort\r\n")
    segments = store.files.segments()
    assert len(segments) == 3  # limit=1: one segment a commit
    store.files.path(segments[1]).unlink()
    with caplog.at_level(logging.ERROR, logger="mailhub.deliver"):
        drain(make_worker(store, server))
    assert [store.row(i).status for i in (big[0], big[2], small)] == ["sent"] * 3
    lost = store.row(big[1])
    assert (lost.status, lost.reason) == ("queued", "internal error; see the log")
    assert lost.next_attempt_at > utcnow() and lost.sending_since is None
    assert any("cannot open a queue payload file" in r.getMessage() or
               "cannot open a queue payload file" in str(r.exc_info) for r in caplog.records)
    assert len(server.transactions) == 3


def test_require_tls_row_waits_for_tls(store: Store, servers: list[SmtpDouble]) -> None:
    server = serve(servers)  # no STARTTLS
    item = store.enqueue("desk@airline.example", b"x\r\n", require_tls=True)
    drain(make_worker(store, server))
    row = store.row(item)
    assert row.status == "queued" and "offered no TLS" in row.reason
    assert server.transactions == [] and "MAIL" not in server.verbs()


def test_internal_relay_and_smtputf8(store: Store, servers: list[SmtpDouble]) -> None:
    smarthost, internal = serve(servers), serve(servers)
    store.enqueue("ops@medvoyage.example", b"inbound copy\r\n", relay="internal")
    store.enqueue("pacienté@clinic-a.example", b"out\r\n")
    drain(make_worker(store, smarthost, internal=internal))
    assert [tx.body for tx in internal.transactions] == [b"inbound copy\r\n"]
    assert [tx.body for tx in smarthost.transactions] == [b"out\r\n"]
    assert smarthost.transactions[0].commands[0].endswith(b" SMTPUTF8\r\n")
    assert not internal.transactions[0].commands[0].endswith(b" SMTPUTF8\r\n")


@pytest.mark.parametrize("commits", [True, False])
def test_run_loop_wakes_from_any_thread_and_quits_on_close(store: Store,
                                                           servers: list[SmtpDouble],
                                                           commits: bool) -> None:
    server = serve(servers)
    worker = make_worker(store, server, commits=commits)
    later = [f"later {i}\r\n".encode() for i in range(10)]  # more than workers: a batch tail

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop, idle=3600))  # only a wake can start it
        await asyncio.sleep(0.05)
        store.enqueue("r@clinic-a.example", b"first\r\n")
        worker.wake()
        await wait_for(lambda: len(server.transactions) == 1)
        for body in later:
            store.enqueue("r@clinic-a.example", body)
        threading.Thread(target=worker.wake).start()  # as the DSN hook does, off the loop
        await wait_for(lambda: len(server.transactions) == 11)
        stop.set()
        await asyncio.wait_for(task, 30)
        await asyncio.to_thread(worker.close)

    asyncio.run(scenario())
    if worker.commits is not None:
        worker.commits.close()
    assert server.transactions[0].body == b"first\r\n"
    assert sorted(tx.body or b"" for tx in server.transactions[1:]) == sorted(later)
    assert server.verbs().count("QUIT") == server.connections  # every connection said goodbye
    assert {r.status for r in queue.list_items(store.engine)} == {"sent"}


async def wait_for(cond: Callable[[], bool], timeout: float = 20) -> None:
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not reached")


def test_rows_waiting_together_are_chained_and_each_keeps_its_outcome(
        store: Store, servers: list[SmtpDouble], monkeypatch: pytest.MonkeyPatch) -> None:
    """A sender takes the rows waiting for it and sends them pipelined back to back; a refused
    row in the middle is failed alone and the rows around it are sent, each exactly once."""
    server = serve(servers, rcpt_replies={"gone@clinic-a.example": "550 5.1.1 no such user"})
    rcpts = [f"r{i}@clinic-a.example" for i in range(12)]
    rcpts[5] = "gone@clinic-a.example"
    ids = [store.enqueue(r, f"Subject: {i}\r\n\r\nbody {i}\r\n".encode())
           for i, r in enumerate(rcpts)]
    chains: list[int] = []
    real = SmtpConnection.send_many

    def spy(self: SmtpConnection, items: list[Outgoing]) -> list[SendResult]:
        chains.append(len(items))
        return real(self, items)

    monkeypatch.setattr(SmtpConnection, "send_many", spy)
    worker = make_worker(store, server, workers=1)  # one sender: every row on its connection
    drain(worker)
    assert max(chains) > 1 and sum(chains) <= len(ids)  # rows went together, none twice
    statuses = [store.row(i).status for i in ids]
    assert statuses == ["sent"] * 5 + ["failed"] + ["sent"] * 6
    assert store.failed == [(ids[5], "550 5.1.1 no such user")]
    bodies = sorted(unstuff(tx.body or b"") for tx in server.transactions)
    assert bodies == sorted(f"Subject: {i}\r\n\r\nbody {i}\r\n".encode()
                            for i in range(12) if i != 5)
    assert server.connections == 1
    assert server.verbs().count("MAIL") == 12 and server.verbs().count("RSET") == 1


def test_a_row_still_being_sent_is_never_claimed_again(store: Store,
                                                       servers: list[SmtpDouble]) -> None:
    """A claim older than ``stale_after`` is taken over (its sender died), but not while this
    worker is still sending it: a slow smarthost and a long batch used to get the tail of the
    batch claimed and sent a second time. Here every claim is stale at once."""
    import time

    from mailhub.deliver.worker import CHAIN

    server = serve(servers, pipelining=False)
    server.on_data.append(lambda: time.sleep(0.05))  # a smarthost that takes its time
    ids = [store.enqueue(f"r{i}@clinic-a.example", f"Subject: {i}\r\n\r\nbody {i}\r\n".encode())
           for i in range(CHAIN + 1)]
    worker = make_worker(store, server, workers=1)
    worker.stale_after = timedelta(0)
    worker.run_batch()  # returns with the last row still in flight
    worker.run_batch()
    drain(worker)
    bodies = [unstuff(tx.body or b"") for tx in server.transactions]
    assert sorted(bodies) == sorted(f"Subject: {i}\r\n\r\nbody {i}\r\n".encode()
                                    for i in range(CHAIN + 1))  # each exactly once
    assert [store.row(i).status for i in ids] == ["sent"] * len(ids)
    assert [store.row(i).attempts for i in ids] == [1] * len(ids)


def test_shutdown_cuts_off_a_next_hop_that_does_not_answer(store: Store,
                                                            servers: list[SmtpDouble],
                                                            caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    """A smarthost that took the data and never answers does not hold a shutdown for its ten
    minutes: past the grace the send is cut off and the row stays queued for the restart."""
    server = serve(servers, final_delay=-1)
    item = store.enqueue("slow@clinic-a.example", b"x\r\n")
    worker = make_worker(store, server)
    worker.run_batch()
    while not server.transactions:
        time.sleep(0.01)
    with caplog.at_level(logging.WARNING, logger="mailhub.deliver"):
        worker.close(grace=0.2)
    assert worker.commits is not None
    worker.commits.close()
    row = store.row(item)
    assert (row.status, row.sending_since) == ("queued", None)
    assert row.reason.startswith("not sent: the hub was shutting down")
    assert server.connections == 1 and len(server.transactions) == 1
    assert store.failed == []
    assert any("cut off" in r.getMessage() for r in caplog.records)
