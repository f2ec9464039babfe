"""The AUTH failure throttle: its rule (pure, on a fake clock), the same rule on the table the
submission processes share, and that sharing across real processes."""

from __future__ import annotations

import multiprocessing

import pytest

from mailhub.ingress.auth import FailureThrottle
from mailhub.ingress.shared_throttle import FailureTable, SharedFailureThrottle

IP = "203.0.113.9"


def _throttles() -> list[FailureThrottle]:
    table = FailureTable.create(multiprocessing.get_context("spawn"), slots=64)
    return [FailureThrottle(free_failures=3), SharedFailureThrottle(free_failures=3, table=table)]


@pytest.mark.parametrize("throttle", _throttles(), ids=["in-process", "shared"])
def test_free_failures_then_doubling_delays_forgotten_after_a_while(
        throttle: FailureThrottle) -> None:
    for n in range(2):
        throttle.failed(IP, now=100.0 + n)
        assert throttle.delay_for(IP, now=100.0 + n) == 0.0  # a mistyped password is free
    delays: list[float | None] = []  # the wait before answering the next AUTH
    now = 102.0
    for _ in range(2, 9):  # one connection: each AUTH is sent once the last was answered
        throttle.failed(IP, now=now)
        delays.append(delay := throttle.delay_for(IP, now=now))
        now += delay or 0.0
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert throttle.delay_for("198.51.100.1", now=now) == 0.0  # per address
    assert throttle.delay_for(IP, now=now + 901) == 0.0  # forgotten after 15 minutes
    throttle.failed(IP, now=2000.0)
    assert throttle.delay_for(IP, now=2000.0) == 0.0  # counting starts over
    for n in range(5):
        throttle.failed(IP, now=2001.0 + n)
    assert throttle.delay_for(IP, now=2006.0) > 0
    throttle.succeeded(IP)
    assert throttle.delay_for(IP, now=2006.0) == 0.0


@pytest.mark.parametrize("throttle", _throttles(), ids=["in-process", "shared"])
def test_auths_on_parallel_connections_take_turns(throttle: FailureThrottle) -> None:
    """Many connections from one guesser get one AUTH per step between them, not one each;
    one whose turn is over ``max_delay`` away is refused at once instead of waiting."""
    for _ in range(5):
        throttle.failed(IP, now=100.0)  # two over the free ones: a step of 4 s
    waits = [throttle.delay_for(IP, now=100.0) for _ in range(9)]
    assert waits == [4.0, 8.0, 12.0, 16.0, 20.0, 24.0, 28.0, None, None]
    assert throttle.delay_for("198.51.100.1", now=100.0) == 0.0  # others are not held up
    assert throttle.delay_for(IP, now=128.0) == 4.0  # once the turns have passed
    throttle.succeeded(IP)
    assert throttle.delay_for(IP, now=128.0) == 0.0


def _fail_in_child(table: FailureTable, client: str, times: int) -> None:
    throttle = SharedFailureThrottle(free_failures=3, table=table)
    for _ in range(times):
        throttle.failed(client)


def test_failures_counted_in_one_process_slow_down_another() -> None:
    ctx = multiprocessing.get_context("spawn")  # as the submission children are made
    table = FailureTable.create(ctx)
    children = [ctx.Process(target=_fail_in_child, args=(table, IP, 3)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    here = SharedFailureThrottle(free_failures=3, table=table)
    assert here.delay_for(IP) == 8.0  # six failures from two processes: three over the free ones
    here.succeeded(IP)
    done = ctx.Process(target=_fail_in_child, args=(table, IP, 1))
    done.start()
    done.join(60)
    assert here.delay_for(IP) == 0.0  # a success anywhere clears it everywhere; one new failure
    assert here._get(IP) is not None and here._get(IP)[0] == 1  # noqa: SLF001
