"""Large queue payloads in segment files beside SQLite: rows name where the sealed bytes lie,
the bytes are fsync'd before the commit that names them (once per commit), rolled-back appends
leave no trace a row depends on, a restart never appends to an old segment, and the sweep
deletes segments no row names (after compacting old ones a retried row still names)."""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from mailhub.crypto.atrest import AtRest
from mailhub.deliver import payload_files, payloads, queue
from mailhub.deliver.payload_files import PayloadFiles
from mailhub.deliver.retention import COMPACT_GRACE, PayloadSweeper
from mailhub.errors import StoreError
from mailhub.store.db import make_engine, migrate
from mailhub.store.models import Payload

SEALER = AtRest(os.urandom(32))
BIG = os.urandom(100_000)


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    eng = make_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    migrate(eng)
    return eng


@pytest.fixture
def files(tmp_path: Path) -> PayloadFiles:
    return PayloadFiles(tmp_path / "payloads", inline_max=1024)


def row(engine: Engine, pid: int) -> Payload:
    with Session(engine) as s:
        got = s.get(Payload, pid)
        assert got is not None
        return got


def add(engine: Engine, files: PayloadFiles, data: bytes, status: str = "queued",
        n: int = 0, ended: datetime | None = None) -> tuple[int, int]:
    with Session(engine) as s:
        pid = payloads.insert_payload(s, data, SEALER, files)
        extra = {"updated_at": ended} if ended else {}
        rid = queue.insert_item(s, source_id=f"spool-{n}", recipient=f"r{n}@clinic.example",
                                status=status, payload_id=pid, **extra)
        s.commit()
    return rid, pid


def opened(engine: Engine, files: PayloadFiles, pid: int) -> bytes:
    sealed = payloads.load_payloads(engine, [pid], files)[pid]
    return SEALER.open(sealed, str(pid).encode())


def test_large_payloads_lie_in_a_file_small_ones_in_their_row(engine: Engine,
                                                             files: PayloadFiles) -> None:
    with Session(engine) as s:
        big, small, other = payloads.insert_payloads(s, [BIG, b"short notice", BIG[::-1]],
                                                     SEALER, files)
        s.commit()
    assert files.syncs == 1  # one fdatasync for every append of the commit
    for pid in (big, other):
        stored = row(engine, pid)
        assert stored.sealed == b"" and stored.segment == files.current
        assert stored.seg_length is not None and stored.seg_length > len(BIG)
    assert row(engine, small).segment is None and row(engine, small).sealed != b""
    assert opened(engine, files, big) == BIG
    assert opened(engine, files, other) == BIG[::-1]
    assert opened(engine, files, small) == b"short notice"
    # what the file holds is sealed: the plaintext is not in it
    segment = files.path(files.current).read_bytes()
    assert BIG[:64] not in segment
    assert oct(files.path(files.current).stat().st_mode & 0o777) == "0o600"


def resident_pages(path: Path) -> int:
    """Pages of ``path`` in the page cache (mincore over a private mapping, which reads
    nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY) as m:
        vec = (ctypes.c_ubyte * pages)()
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return sum(v & 1 for v in vec)


def file_system(path: Path) -> str:
    """The type of the file system holding ``path`` (longest mount point in /proc/mounts)."""
    best, kind = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        mount = fields[1].replace("\\040", " ")
        if str(path).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
            best, kind = mount, fields[2]
    return kind


@pytest.fixture
def disk_files(tmp_path: Path) -> Iterator[PayloadFiles]:
    """Segment files on a disk-backed file system: on tmpfs the page cache is where files
    live, so nothing could be let go. When the temporary folder is on tmpfs, a folder beside
    this test (in the checkout) is used instead."""
    if file_system(tmp_path) != "tmpfs":
        yield PayloadFiles(tmp_path / "payloads", inline_max=1024)
        return
    folder = Path(tempfile.mkdtemp(prefix=".payload-cache-test-", dir=Path(__file__).parent))
    try:
        assert file_system(folder) != "tmpfs", "no disk-backed folder to test the page cache on"
        yield PayloadFiles(folder / "payloads", inline_max=1024)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_synced_payloads_leave_the_page_cache(engine: Engine, disk_files: PayloadFiles) -> None:
    """Written once and read back only after a restart or a retry, a payload's pages are let
    go once synced; the file still reads back whole."""
    files = disk_files
    pids = []
    for n in range(3):
        _, pid = add(engine, files, BIG, n=n)
        pids.append(pid)
        path = files.path(files.current)
        assert path.stat().st_size > (n + 1) * len(BIG)
        assert resident_pages(path) <= 1  # at most the last, partial page
    assert [opened(engine, files, pid) for pid in pids] == [BIG] * 3
    assert resident_pages(path) > 2 * len(BIG) // mmap.PAGESIZE  # read back: cached again


def test_without_files_every_payload_stays_in_its_row(engine: Engine) -> None:
    with Session(engine) as s:
        pid = payloads.insert_payload(s, BIG, SEALER)
        s.commit()
    assert row(engine, pid).segment is None
    assert SEALER.open(row(engine, pid).sealed, str(pid).encode()) == BIG


def test_a_row_in_a_file_needs_the_folder_to_be_read(engine: Engine,
                                                    files: PayloadFiles) -> None:
    _, pid = add(engine, files, BIG)
    with pytest.raises(StoreError, match="payload file"):
        payloads.load_payloads(engine, [pid])


def test_a_savepoint_rolled_back_keeps_the_earlier_appends_synced(engine: Engine,
                                                                  files: PayloadFiles) -> None:
    with Session(engine) as s:
        pid = payloads.insert_payload(s, BIG, SEALER, files)
        nested = s.begin_nested()
        payloads.insert_payload(s, BIG[::-1], SEALER, files)
        nested.rollback()
        s.commit()
    assert files.syncs == 1 and opened(engine, files, pid) == BIG
    assert files.busy() == {files.current}  # the transaction is over: nothing held


def test_rolled_back_appends_are_not_synced_and_name_nothing(engine: Engine,
                                                            files: PayloadFiles) -> None:
    with Session(engine) as s:
        payloads.insert_payload(s, BIG, SEALER, files)
        s.rollback()
        s.commit()  # a later commit of the same session has nothing of it to sync
    assert files.syncs == 0
    with Session(engine) as s:
        assert s.execute(select(Payload.id)).first() is None  # type: ignore[call-overload]


def test_a_failed_sync_fails_the_commit(engine: Engine, files: PayloadFiles,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(payload_files, "_sync", broken)
    with Session(engine) as s:
        payloads.insert_payload(s, BIG, SEALER, files)
        with pytest.raises(StoreError, match="cannot sync"):
            s.commit()
    with Session(engine) as s:
        assert s.execute(select(Payload.id)).first() is None  # type: ignore[call-overload]
    monkeypatch.undo()
    _, pid = add(engine, files, BIG)  # the next commit goes to a new segment and stands
    assert opened(engine, files, pid) == BIG and len(files.segments()) == 2


def test_a_failed_sync_fails_every_transaction_that_wrote_the_segment(
        engine: Engine, files: PayloadFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = Session(engine), Session(engine)
    try:
        payloads.insert_payload(first, BIG, SEALER, files)
        # (SQLite lets one transaction write at a time; the bytes go in before the row)
        assert files.append(second, BIG[::-1]).segment == files.current
        with monkeypatch.context() as m:
            m.setattr(payload_files, "_sync", lambda fd: (_ for _ in ()).throw(OSError(5, "EIO")))
            with pytest.raises(StoreError):
                first.commit()
        with pytest.raises(StoreError, match="could not be synced"):
            second.commit()  # its bytes were in the segment whose fsync failed
    finally:
        first.close()
        second.close()
    _, pid = add(engine, files, BIG)  # a later transaction writes to a new segment
    assert opened(engine, files, pid) == BIG


def test_the_sweep_keeps_a_segment_a_transaction_in_progress_wrote(engine: Engine,
                                                                   tmp_path: Path) -> None:
    """The segment is closed (idle) and no committed row names it yet, but a transaction
    that appended to it has not committed: deleting it then would lose that message."""
    files = PayloadFiles(tmp_path / "race", inline_max=1024, idle_close=0.0)
    writer = Session(engine)
    try:
        pid = payloads.insert_payload(writer, BIG, SEALER, files)
        segment = files.current
        with Session(engine) as s:
            assert payload_files.dead_segments(s, files) == []  # closed now, but held
        assert files.current == 0
        files.remove(segment)
        writer.commit()
    finally:
        writer.close()
    assert opened(engine, files, pid) == BIG
    with Session(engine) as s:  # once committed, a row names it: still not dead
        assert payload_files.dead_segments(s, files) == []
    with Session(engine) as s:  # rolled back instead, nothing names it: dead
        payloads.insert_payload(s, BIG, SEALER, files)
        other = files.current
        s.rollback()
    with Session(engine) as s:
        assert payload_files.dead_segments(s, files) == [other]


def test_a_restart_starts_a_new_segment_after_every_old_one(engine: Engine, tmp_path: Path,
                                                            files: PayloadFiles) -> None:
    _, first = add(engine, files, BIG, n=1)
    old = files.current
    with files.path(old).open("ab") as seg:
        seg.write(b"torn tail of a crash")
    ahead = old + 10**12  # a segment made while the clock ran days ahead
    files.path(ahead).write_bytes(b"")
    again = PayloadFiles(files.folder, inline_max=1024)
    _, second = add(engine, again, BIG, n=2)
    assert again.current > ahead and files.segments() == [old, ahead, again.current]
    assert opened(engine, again, first) == BIG and opened(engine, again, second) == BIG


def test_segments_rotate_at_their_limit(engine: Engine, tmp_path: Path) -> None:
    small = PayloadFiles(tmp_path / "rot", inline_max=1024, limit=150_000)
    pids = [add(engine, small, BIG, n=i)[1] for i in range(3)]
    assert len(small.segments()) == 2  # the second commit filled the first segment
    assert [opened(engine, small, p) for p in pids] == [BIG] * 3


def test_the_sweep_deletes_segments_no_row_names(engine: Engine, tmp_path: Path) -> None:
    files = PayloadFiles(tmp_path / "sw", inline_max=1024, limit=150_000)
    long_ago = datetime.now(UTC) - timedelta(days=3)
    sent = [add(engine, files, BIG, "sent", n=i, ended=long_ago) for i in range(2)]
    waiting = add(engine, files, BIG, "queued", n=9)
    assert len(files.segments()) == 2 and files.current == files.segments()[-1]

    sweeper = PayloadSweeper(86400, files=files)
    assert asyncio.run(run_sweep(engine, sweeper)) == 2
    # the first segment held only the sent ones; the open one is never deleted
    assert files.segments() == [files.current] and sweeper.segments_removed == 1
    assert opened(engine, files, waiting[1]) == BIG
    assert all(row_gone(engine, pid) for _, pid in sent)


def test_an_old_segment_a_retried_row_still_names_is_compacted(engine: Engine,
                                                              tmp_path: Path) -> None:
    files = PayloadFiles(tmp_path / "cp", inline_max=1024, limit=1)  # every commit rotates
    _, retried = add(engine, files, BIG, "queued", n=1)
    first = files.segments()[0]
    files.limit = 1 << 30
    _, still_open = add(engine, files, BIG, "queued", n=2)
    sweeper = PayloadSweeper(60, files=files)
    later = datetime.now(UTC) + timedelta(seconds=60 + COMPACT_GRACE + 5)
    asyncio.run(run_sweep(engine, sweeper, later))
    assert first not in files.segments()
    assert row(engine, retried).segment is None and opened(engine, files, retried) == BIG
    # the open segment is as old, but it may still grow: it is left alone
    assert row(engine, still_open).segment == files.current
    assert opened(engine, files, still_open) == BIG
    # not yet old: a new segment still named by a row is left alone
    _, recent = add(engine, files, BIG, "queued", n=3)
    asyncio.run(run_sweep(engine, sweeper))
    assert row(engine, recent).segment is not None and opened(engine, files, recent) == BIG


def test_a_quiet_hub_lets_go_of_its_open_segment(engine: Engine, tmp_path: Path) -> None:
    files = PayloadFiles(tmp_path / "idle", inline_max=1024, idle_close=0.0)
    long_ago = datetime.now(UTC) - timedelta(days=3)
    add(engine, files, BIG, "sent", n=1, ended=long_ago)
    assert files.current and len(files.segments()) == 1
    asyncio.run(run_sweep(engine, PayloadSweeper(60, files=files)))
    assert files.current == 0 and files.segments() == []
    _, pid = add(engine, files, BIG, n=2)  # the next payload opens a new segment
    assert len(files.segments()) == 1 and opened(engine, files, pid) == BIG


def row_gone(engine: Engine, pid: int) -> bool:
    with Session(engine) as s:
        return s.get(Payload, pid) is None


async def run_sweep(engine: Engine, sweeper: PayloadSweeper, now: datetime | None = None) -> int:
    commits = queue.GroupCommit(engine)
    try:
        return await sweeper.sweep(commits, now=now)
    finally:
        commits.close()
