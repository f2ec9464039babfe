"""``SpoolRunner``: waiting messages go to their batch processor by listener, a batch at most
``max_batch`` long; failures are counted per message, retried, then shunted (never dropped).

The processors here are plain functions standing in for the pipeline (the runner takes any
callable); the spool is the hub's real one, used through its public methods.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from mailhub.app import Hub
from mailhub.runner import SpoolRunner
from mailhub.spool.spool import Envelope
from tests.cases.case_support import make_hub, shared_parts

Item = tuple[str, str] | None


@pytest.fixture
def hub(request: pytest.FixtureRequest) -> Iterator[Hub]:
    root = Path(tempfile.mkdtemp(prefix="mhr", dir="/tmp"))
    h = make_hub(root, migrate=False, shared=shared_parts(request.config))
    try:
        yield h
    finally:
        h.engine.dispose()
        shutil.rmtree(root, ignore_errors=True)


async def _never(listener: str, spool_id: str) -> None:
    raise AssertionError("the single-message processor is not used for batch listeners")


def _runner(hub: Hub, **kw: float) -> SpoolRunner:
    return SpoolRunner(hub, {"submission": _never, "scheduler": _never}, **kw)  # type: ignore[arg-type]


def _queued(runner: SpoolRunner) -> list[Item]:
    """Empty the runner's queue (what it carries over first) and return it, in order."""
    out: list[Item] = list(reversed(runner._carry))
    runner._carry.clear()
    while not runner.queue.empty():
        out.append(runner.queue.get_nowait())
    return out


def _take_first(runner: SpoolRunner) -> dict[str, list[str]]:
    first = runner.queue.get_nowait()
    assert first is not None
    return runner._take(first)


def test_take_groups_by_listener_and_caps_a_batch() -> None:
    runner = SpoolRunner(None, {}, max_batch=3)  # type: ignore[arg-type]
    for n in range(5):
        runner.submit("submission", f"s{n}")
        if n < 2:
            runner.submit("scheduler", f"c{n}")
    assert _take_first(runner) == {"submission": ["s0", "s1", "s2"], "scheduler": ["c0", "c1"]}
    assert _queued(runner) == [("submission", "s3"), ("submission", "s4")]


def test_take_keeps_the_stop_marker() -> None:
    runner = SpoolRunner(None, {}, max_batch=2)  # type: ignore[arg-type]
    for n in range(3):
        runner.submit("submission", f"s{n}")
    runner.queue.put_nowait(None)
    runner.submit("submission", "late")
    groups = _take_first(runner)
    assert groups == {"submission": ["s0", "s1"]}
    rest = _queued(runner)
    assert rest.count(None) == 1
    assert sorted(i for i in rest if i is not None) == [("submission", "late"),
                                                        ("submission", "s2")]  # none lost
    # a stop marker right behind the first message
    runner.submit("scheduler", "c0")
    runner.queue.put_nowait(None)
    assert _take_first(runner) == {"scheduler": ["c0"]}
    assert _queued(runner) == [None]


def test_take_with_many_waiting_keeps_the_rest_in_order() -> None:
    """Whatever a batch leaves behind is taken next time, oldest first."""
    runner = SpoolRunner(None, {}, max_batch=3)  # type: ignore[arg-type]
    for n in range(7):
        runner.submit("submission", f"s{n}")
    assert _take_first(runner) == {"submission": ["s0", "s1", "s2"]}
    assert _queued(runner) == [("submission", f"s{n}") for n in range(3, 7)]


def test_take_with_very_many_waiting_keeps_the_rest_in_order() -> None:
    runner = SpoolRunner(None, {}, max_batch=3)  # type: ignore[arg-type]
    for n in range(12):
        runner.submit("submission", f"s{n}")
    assert _take_first(runner) == {"submission": ["s0", "s1", "s2"]}
    assert _queued(runner) == [("submission", f"s{n}") for n in range(3, 12)]


Batch = Callable[[str, list[str]], Awaitable[dict[str, BaseException]]]


def _spool(hub: Hub, listener: str, n: int) -> str:
    env = Envelope("lena@medvoyage.example", [f"r{n}@clinic.example"], listener)
    return hub.spool.accept(env, f"Subject: note {n}\r\n\r\nbody {n}\r\n".encode())


async def _run_until(runner: SpoolRunner, done: Callable[[], bool]) -> None:
    """Run the runner until ``done()`` holds, then stop it (a generous cap, never a timing)."""
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    for _ in range(5000):
        if done():
            break
        await asyncio.sleep(0.005)
    stop.set()
    await asyncio.wait_for(task, 30)
    assert done()


def test_batches_failures_retries_and_shunt(hub: Hub) -> None:
    sub = [_spool(hub, "submission", n) for n in range(5)]
    sched = [_spool(hub, "scheduler", n) for n in range(2)]
    flaky, doomed, gone = sub[1], sub[3], "18e0000000000000-00000000aa"
    calls: list[tuple[str, list[str]]] = []
    attempts: dict[str, int] = {}

    async def process(listener: str, ids: list[str]) -> dict[str, BaseException]:
        """Fails ``doomed`` every time, ``flaky`` twice; finishes the others as the pipeline
        does (rows written, then the spool entry removed)."""
        calls.append((listener, list(ids)))
        failed: dict[str, BaseException] = {}
        for sid in ids:
            attempts[sid] = attempts.get(sid, 0) + 1
            if sid == gone:
                failed[sid] = FileNotFoundError(sid)
            elif sid == doomed or (sid == flaky and attempts[sid] <= 2):
                failed[sid] = RuntimeError(f"cannot process {sid}")
            else:
                hub.spool.remove(listener, sid)
        await asyncio.sleep(0)
        return failed

    runner = _runner(hub, max_batch=3, retry_after=0.01, max_failures=3, concurrency=2)
    runner.batch_processors.update(submission=process, scheduler=process)

    async def main() -> None:
        assert runner.recover() == 7
        runner.submit("submission", gone)
        runner.submit("submission", sub[0])  # already waiting: not queued twice
        await _run_until(runner, lambda: attempts.get(doomed) == 3 and not runner.inflight
                         and hub.spool.pending("submission") == [])

    asyncio.run(main())
    # the first batches: as many as max_batch of one listener; the other listener apart
    assert calls[0] == ("submission", sub[:3])
    assert ("scheduler", sched) in calls
    assert all(len(ids) <= 3 for _, ids in calls)
    assert attempts == {**dict.fromkeys([sub[0], sub[2], sub[4], *sched, gone], 1), flaky: 3,
                        doomed: 3}
    assert runner.failures == {}  # counted per message, forgotten when done or shunted
    assert hub.spool.pending("submission") == [] and hub.spool.pending("scheduler") == []
    shunted = list((hub.spool.root / "shunt").glob(f"*{doomed}*"))
    assert len(shunted) == 1 and shunted[0].stat().st_size > 0  # set aside, still sealed


def test_a_processor_that_breaks_fails_every_message_of_its_batch(hub: Hub) -> None:
    ids = [_spool(hub, "submission", n) for n in range(3)]
    seen: list[list[str]] = []

    async def process(listener: str, batch: list[str]) -> dict[str, BaseException]:
        seen.append(list(batch))
        if len(seen) == 1:
            raise RuntimeError("database unavailable")
        for sid in batch:
            hub.spool.remove(listener, sid)
        return {}

    runner = _runner(hub, retry_after=0.01, max_failures=3)
    runner.batch_processors["submission"] = process

    async def main() -> None:
        runner.recover()
        await _run_until(runner, lambda: hub.spool.pending("submission") == []
                         and not runner.inflight)

    asyncio.run(main())
    assert seen[0] == ids
    assert sorted(sid for batch in seen[1:] for sid in batch) == sorted(ids)  # each retried
    assert runner.failures == {}
    assert not (hub.spool.root / "shunt").exists() or not any(
        (hub.spool.root / "shunt").iterdir())


def test_single_message_processors_still_work(hub: Hub) -> None:
    ids = [_spool(hub, "submission", n) for n in range(4)]
    done: list[str] = []
    failures: dict[str, int] = {}

    async def one(listener: str, sid: str) -> None:
        if sid == ids[2] and failures.setdefault(sid, 0) < 1:
            failures[sid] += 1
            raise RuntimeError("once")
        hub.spool.remove(listener, sid)
        done.append(sid)

    runner = SpoolRunner(hub, {"submission": one}, retry_after=0.01, max_batch=2)

    async def main() -> None:
        runner.recover()
        await _run_until(runner, lambda: len(done) == 4 and not runner.inflight)

    asyncio.run(main())
    assert sorted(done) == sorted(ids) and done[-1] == ids[2]
    assert runner.failures == {} and hub.spool.pending("submission") == []
