"""Concurrent writers sharing fsyncs, other processes' views of live segments, torn tails."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import threading
from pathlib import Path

import pytest

from mailhub.spool.frames import SEGMENT_MAGIC, record_head
from mailhub.spool.spool import Spool, pack_message
from tests.spool.support import body, envelope, files, sealer, segments


def test_threads_and_tasks_accepting_at_once_share_fsyncs(tmp_path: Path) -> None:
    spool = Spool(tmp_path, sealer())
    got: list[str] = []
    lock = threading.Lock()

    def thread_writer(t: int) -> None:
        for i in range(25):
            sid = spool.accept(envelope(n=t), body(t * 100 + i))
            with lock:
                got.append(sid)

    async def tasks() -> list[str]:
        return await asyncio.gather(*(spool.accept_async(envelope(n=i), body(5000 + i))
                                      for i in range(80)))

    threads = [threading.Thread(target=thread_writer, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    from_tasks = asyncio.run(tasks())
    for th in threads:
        th.join()
    total = len(got) + len(from_tasks)
    assert total == 280 and len(set(got) | set(from_tasks)) == 280
    assert spool.fsync_count < total // 2  # appends made during an fsync share the next one
    other = Spool(tmp_path, spool.sealer)
    assert other.pending("submission") == sorted(got + from_tasks)
    for i, sid in enumerate(from_tasks):
        assert other.load("submission", sid).content == body(5000 + i)
    spool.close()
    other.close()


def test_tasks_on_one_loop_get_their_250_from_one_shared_fsync_round(tmp_path: Path) -> None:
    spool = Spool(tmp_path, sealer())

    async def burst() -> list[str]:
        return await asyncio.gather(*(spool.accept_async(envelope(n=i), body(i))
                                      for i in range(50)))

    before = spool.fsync_count
    sids = asyncio.run(burst())
    assert len(set(sids)) == 50
    assert spool.fsync_count - before < 25
    assert [spool.load("submission", s).content for s in sids] == [body(i) for i in range(50)]
    spool.close()


def _live_segment(folder: Path) -> tuple[int, Path]:
    """A segment held open by a 'writer' (an exclusive flock, as another process holds it)."""
    path = folder / "0000000000000001-1-aaaaaa.seg"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, SEGMENT_MAGIC)
    return fd, path


def _record(box: object, sid: str, content: bytes) -> bytes:
    blob = box.seal(pack_message(envelope(), content), sid.encode())  # type: ignore[attr-defined]
    head, _ = record_head(sid.encode(), blob)
    return head + blob


def test_a_record_half_written_by_a_live_writer_is_waited_for(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    box = sealer()
    reader = Spool(tmp_path, box)
    fd, path = _live_segment(tmp_path / "submission")
    one, two = _record(box, "rec-1", b"one"), _record(box, "rec-2", b"two")
    os.write(fd, one + two[:40])  # the second is being written right now
    with caplog.at_level(logging.WARNING, logger="mailhub.spool"):
        assert reader.pending("submission") == ["rec-1"]
        assert not reader.contains("submission", "rec-2")
    assert caplog.records == []  # a live writer's tail is not torn
    os.write(fd, two[40:])
    assert reader.load("submission", "rec-2").content == b"two"  # the scan resumed there
    reader.remove("submission", "rec-1")
    reader.remove("submission", "rec-2")
    assert path.exists()  # all done, but its writer may still append
    os.close(fd)  # the writer rotates or exits: the lock goes
    assert reader.pending("submission") == []
    assert files(reader) == []
    reader.close()


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_torn_tail_is_ignored_with_a_warning(tmp_path: Path, damage: str,
                                               caplog: pytest.LogCaptureFixture) -> None:
    box = sealer()
    spool = Spool(tmp_path, box)
    sids = [spool.accept(envelope(n=i), body(i)) for i in range(3)]
    spool.close()
    [seg] = segments(spool)
    size = seg.stat().st_size
    with open(seg, "r+b") as f:
        if damage == "truncate":  # a crash in the middle of the last record's blob
            f.truncate(size - 1000)
        else:  # a crash that left a frame's bytes half on disk
            f.seek(0, os.SEEK_END)
            f.write(b"MHR1\x05" + b"\x00" * 30)
    with caplog.at_level(logging.WARNING, logger="mailhub.spool"):
        after = Spool(tmp_path, box)
        expected = sorted(sids[:2] if damage == "truncate" else sids)
        assert after.pending("submission") == expected
    assert any(seg.name in r.getMessage() and "incomplete" in r.getMessage()
               for r in caplog.records)
    if damage == "truncate":
        with pytest.raises(FileNotFoundError):
            after.load("submission", sids[2])
    assert after.load("submission", sids[1]).content == body(1)
    for sid in expected:
        after.remove("submission", sid)
    assert files(after) == []  # the torn record does not keep the segment alive
    after.close()
