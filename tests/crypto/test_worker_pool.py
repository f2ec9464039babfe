"""The crypto worker pool: outcomes cross intact, and a dead worker costs one job at most."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import CancelledError, Future
from pathlib import Path

import pytest

from mailhub.crypto.worker_pool import WorkerPool
from mailhub.errors import DecryptionFailed, WorkerLost
from tests.crypto.process_watch import gone, wait_until

REPO = Path(__file__).resolve().parents[2]


def refuse(text: str) -> None:
    raise DecryptionFailed(text, hint="encrypt to the hub's key")


def echo(data: bytes) -> bytes:
    return data[::-1]


def running(future: Future[object]) -> bool:
    return future.running() or future.done()


@pytest.fixture
def pool() -> WorkerPool:
    pool = WorkerPool(1)
    yield pool  # type: ignore[misc]
    pool.shutdown()


def test_results_and_exceptions_come_back_whole(pool: WorkerPool) -> None:
    pid = pool.submit(os.getpid).result(timeout=60)
    assert pid != os.getpid() and pool.worker_pids() == [pid]
    big = os.urandom(3 << 20)  # three times the pipe: written and read in pieces
    assert pool.submit(echo, big).result(timeout=60) == big[::-1]
    with pytest.raises(DecryptionFailed) as caught:
        pool.submit(refuse, "not for our key").result(timeout=60)
    assert caught.value.message == "not for our key"
    assert caught.value.hint == "encrypt to the hub's key"
    assert pool.submit(os.getpid).result(timeout=60) == pid  # the same worker served all


def test_a_job_that_cannot_be_sent_fails_alone(pool: WorkerPool) -> None:
    with pytest.raises(Exception, match="pickle|local object"):
        pool.submit(lambda: 1).result(timeout=60)
    assert pool.submit(len, b"abc").result(timeout=60) == 3
    assert pool.restarts == 0


def test_a_worker_killed_during_a_job_loses_that_job_only(pool: WorkerPool) -> None:
    pid = pool.submit(os.getpid).result(timeout=60)
    slow = pool.submit(time.sleep, 120)
    waiting = pool.submit(os.getpid)  # queued behind it
    wait_until(lambda: running(slow), "the slow job to start")
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerLost, match="killed by signal 9"):
        slow.result(timeout=60)
    new_pid = waiting.result(timeout=60)
    assert new_pid != pid and gone(pid)
    assert pool.restarts == 1 and pool.worker_pids() == [new_pid]


def test_an_idle_worker_that_died_is_replaced_before_the_next_job(pool: WorkerPool) -> None:
    pid = pool.submit(os.getpid).result(timeout=60)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: gone(pid), "the worker to die")
    assert pool.submit(os.getpid).result(timeout=60) not in (pid, os.getpid())
    assert pool.restarts == 1


def test_shutdown_cancels_waiting_jobs_and_stops_the_workers(pool: WorkerPool) -> None:
    pid = pool.submit(os.getpid).result(timeout=60)
    first = pool.submit(time.sleep, 0.5)
    second = pool.submit(os.getpid)
    wait_until(lambda: running(first), "the first job to start")
    pool.shutdown()
    assert first.result(timeout=0) is None  # the running job finished
    assert second.cancelled()
    with pytest.raises(CancelledError):
        second.result(timeout=0)
    assert gone(pid) and pool.worker_pids() == []
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(os.getpid)


HUB = """
import os, sys, time
from mailhub.crypto.worker_pool import WorkerPool
pool = WorkerPool(2)
jobs = [pool.submit(time.sleep, 0.3) for _ in range(2)]  # both workers busy at once
[j.result() for j in jobs]
print(*pool.worker_pids(), flush=True)
time.sleep(600)
"""


def test_workers_exit_when_the_hub_is_killed() -> None:
    hub = subprocess.Popen([sys.executable, "-c", HUB], stdout=subprocess.PIPE, cwd=REPO,
                           env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert hub.stdout is not None
        pids = [int(p) for p in hub.stdout.readline().split()]
        assert len(pids) == 2 and not any(gone(p) for p in pids)
    finally:
        hub.kill()
        hub.wait()
    wait_until(lambda: all(gone(p) for p in pids), "the workers of a killed hub to exit")


def test_a_pool_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="at least one"):
        WorkerPool(0)


def test_workers_reuse_freed_buffers(pool: WorkerPool) -> None:
    from tests.test_heap_reuse import ROUNDS, churn_faults

    pool.submit(churn_faults).result(timeout=60)  # the first round may grow the heap
    assert pool.submit(churn_faults).result(timeout=60) < ROUNDS
