"""Fresh payloads: the senders get just-queued bytes in memory, and only committed ones."""

from __future__ import annotations

import pytest
from sqlalchemy import update
from sqlmodel import Session

from mailhub.deliver import payloads, queue
from mailhub.deliver.fresh import FreshPayloads, Opened, remember, take_claimed
from mailhub.store.models import Payload
from tests.deliver.smtp_double import SmtpDouble, serve, unstuff
from tests.deliver.worker_support import SENDER, Store, drain, make_worker


def test_an_entry_is_taken_once_and_only_under_its_own_row_and_payload() -> None:
    fresh = FreshPayloads()
    fresh.put_many([(1, 10, b"one"), (2, 10, b"one"), (3, 11, b"three")])
    assert fresh.take(1, 11) is None  # another row's payload id
    assert fresh.take(4, 10) is None  # another row
    assert fresh.take(1, 10) == b"one"
    assert fresh.take(1, 10) is None  # once
    assert fresh.take(2, 10) == b"one"  # recipients sharing a payload each have theirs
    assert len(fresh) == 1


def test_size_and_age_bounds_push_out_the_oldest() -> None:
    fresh = FreshPayloads(max_bytes=10)
    fresh.put_many([(1, 1, b"aaaa"), (2, 2, b"bbbb")])
    fresh.put_many([(3, 3, b"cccc")])  # 12 bytes: the oldest goes
    assert fresh.take(1, 1) is None
    assert (fresh.take(2, 2), fresh.take(3, 3)) == (b"bbbb", b"cccc")
    fresh.put_many([(4, 4, b"x" * 11)])  # larger than the bound: never kept
    assert len(fresh) == 0
    stale = FreshPayloads(max_age=-1.0)  # everything is already too old
    stale.put_many([(5, 5, b"late")])
    assert stale.take(5, 5) is None
    off = FreshPayloads(max_bytes=0)
    off.put_many([(6, 6, b"off")])
    assert len(off) == 0


def test_a_claim_in_the_same_transaction_takes_them_and_the_rest_waits_for_the_commit() -> None:
    fresh = FreshPayloads()
    info: dict[str, object] = {}
    remember(info, fresh, [(1, 10, b"one"), (2, 11, b"two")])
    remember(info, fresh, [(3, 12, b"three")])
    assert len(fresh) == 0  # nothing before the commit
    got = take_claimed(info, fresh, [(1, 10), (9, 99)])
    assert got == {10: Opened(b"one")}
    hooks = info.pop("mailhub.after_commit")
    assert isinstance(hooks, list) and len(hooks) == 1  # one hook however many writes
    hooks[0]()
    assert len(fresh) == 2 and fresh.take(1, 10) is None  # the claimed one is not kept again
    assert (fresh.take(2, 11), fresh.take(3, 12)) == (b"two", b"three")


def _queue_row(store: Store, session: Session, data: bytes, n: int) -> tuple[int, int]:
    pid = payloads.insert_payload(session, data, store.sealer)
    row = queue.insert_item(session, source_id=f"spool-{n}", message_id=f"<m{n}@pc>",
                            sender=SENDER, recipient=f"r{n}@clinic-a.example", payload_id=pid)
    return row, pid


def _spoil(store: Store, pid: int) -> None:
    """Overwrite a stored payload: a sender that reads the database can no longer open it."""
    with Session(store.engine) as session:
        session.execute(update(Payload).where(Payload.id == pid).values(  # type: ignore[arg-type]
            sealed=b"spoiled"))
        session.commit()


@pytest.mark.parametrize("in_memory", [True, False])
def test_the_sender_uses_the_committed_bytes_in_memory(store: Store,
                                                       servers: list[SmtpDouble],
                                                       in_memory: bool) -> None:
    server = serve(servers)
    worker = make_worker(store, server)
    assert worker.commits is not None
    body = b"Subject: fresh\r\n\r\nbody\r\n"

    def write(session: Session) -> tuple[int, int]:
        row, pid = _queue_row(store, session, body, 0)
        if in_memory:
            remember(session.info, worker.fresh, [(row, pid, body)])
        return row, pid

    row, pid = worker.commits.call(write)
    assert len(worker.fresh) == (1 if in_memory else 0)
    _spoil(store, pid)
    drain(worker)
    if in_memory:  # the database copy was never read
        assert [unstuff(tx.body or b"") for tx in server.transactions] == [body]
        assert store.row(row).status == "sent"
    else:  # the same row read from the database: the spoiled payload does not open
        assert server.transactions == []
        assert store.row(row).status != "sent"


def test_a_rolled_back_transaction_leaves_nothing_in_memory(store: Store,
                                                             servers: list[SmtpDouble]) -> None:
    worker = make_worker(store, serve(servers))
    assert worker.commits is not None

    def write_then_fail(session: Session) -> None:
        row, pid = _queue_row(store, session, b"Subject: x\r\n\r\nnever\r\n", 0)
        remember(session.info, worker.fresh, [(row, pid, b"Subject: x\r\n\r\nnever\r\n")])
        raise RuntimeError("the transaction fails")

    with pytest.raises(RuntimeError):
        worker.commits.call(write_then_fail)
    assert len(worker.fresh) == 0
    assert queue.list_items(store.engine) == []
    drain(worker)
