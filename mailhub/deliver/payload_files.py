"""Large queue payloads in append-only files beside the SQLite database, not inside it.

A payload stored in SQLite is copied by the kernel three times: into the write-ahead log, back
out of it by the checkpoint, and into the database file. For a 200 KiB OpenPGP message (270 KB
sealed) that was most of the commit thread's CPU, 0.3 ms of about 2 ms in the main process.
Appended to a plain file it is copied once, and one ``fdatasync`` covers every payload of a
commit. So with SQLite a payload larger than ``inline_max`` goes to the open segment file
(``<data_dir>/payloads/<microseconds>.pay``, 0600) and its row keeps only where it lies;
PostgreSQL keeps every payload in its row, since another instance must be able to send it.

Durability: a payload is appended before the row that names it is committed, and the segment
is fsync'd (by a ``before_commit`` hook on every session that appended) before that commit.
A crash in between leaves bytes no row names, which go with their segment. A segment is only
ever appended to by the process that created it and is never reopened for appends (a restart
starts a new one), so a torn tail is never followed by a record a row depends on.

Reclaiming: a closed segment that no payload row names any more is deleted (``dead_segments``
after the payload sweep has committed; the open one is closed once idle for ``IDLE_CLOSE``);
one still named long after its messages should have ended (a row retried for days) has those
payloads moved into their rows first (``compact``).
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import bindparam, event, select, update
from sqlalchemy.orm import Session, SessionTransaction

from mailhub.crypto.atrest import fsync_dir
from mailhub.errors import StoreError
from mailhub.store.models import Payload

INLINE_MAX = 32 * 1024  # bytes: a payload up to this size stays in its row (no file, no sync)
SEGMENT_LIMIT = 64 << 20  # bytes appended to a segment before the next one is started
IDLE_CLOSE = 30.0  # seconds without an append before the sweep closes the open segment
SUFFIX = ".pay"
_APPENDED = "mailhub.payload_files"  # session.info key: {files: segments} of this transaction
log = logging.getLogger("mailhub.queue")
_sync = getattr(os, "fdatasync", os.fsync)
_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)
_PAGE = mmap.PAGESIZE
_P = Payload.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Location:
    """Where a payload's sealed bytes lie."""

    segment: int
    offset: int
    length: int


def _error(action: str, exc: OSError) -> StoreError:
    return StoreError(f"cannot {action} a queue payload file: {exc.strerror or exc}",
                      hint="check free space and permissions of the data folder's payloads/")


class PayloadFiles:
    """The segment files of one data folder: one open segment, appended to under a lock.

    A segment that a transaction still in progress appended to is *held* until that
    transaction ends (``release``): the sweep never deletes it, whatever the rows it has
    committed say, since that transaction's rows may still name it.
    """

    def __init__(self, folder: Path | str, *, inline_max: int = INLINE_MAX,
                 limit: int = SEGMENT_LIMIT, idle_close: float = IDLE_CLOSE) -> None:
        self.folder = Path(folder)
        self.inline_max = inline_max
        self.limit = limit
        self.idle_close = idle_close
        self.syncs = 0  # fdatasync calls made (tests check that a commit shares one)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._segment = 0
        self._size = 0
        self._dropped = 0  # bytes of the open segment already let go from the page cache
        self._dirty = False
        self._lost: set[int] = set()  # segments whose appends could not all be synced
        self._held: Counter[int] = Counter()  # segment -> transactions in progress that wrote it
        self._last_append = 0.0

    def __repr__(self) -> str:
        return f"PayloadFiles({str(self.folder)!r}, inline_max={self.inline_max})"

    def wants(self, size: int) -> bool:
        return size > self.inline_max

    def path(self, segment: int) -> Path:
        return self.folder / f"{segment:020d}{SUFFIX}"

    @property
    def current(self) -> int:
        """The open segment (0 when none): the one segment that may still grow."""
        return self._segment if self._fd is not None else 0

    def append(self, session: Session, blob: bytes) -> Location:
        """Append ``blob``; ``session``'s commit will fsync it first."""
        with self._lock:
            try:
                if self._fd is None:
                    self._open()
                assert self._fd is not None
                offset = self._size
                view = memoryview(blob)
                while view:
                    view = view[os.write(self._fd, view):]
            except OSError as exc:
                self._retire()  # a torn tail stays the segment's last bytes
                raise _error("write", exc) from exc
            self._size += len(blob)
            self._dirty = True
            self._last_append = time.monotonic()
            location = Location(self._segment, offset, len(blob))
            mine = session.info.setdefault(_APPENDED, {}).setdefault(self, set())
            if location.segment not in mine:
                mine.add(location.segment)
                self._held[location.segment] += 1
        return location

    def sync(self, segments: set[int]) -> None:
        """Make the appends to ``segments`` durable, before the commit that names them."""
        with self._lock:
            if segments & self._lost:
                raise StoreError("a queue payload file could not be synced",
                                 hint="check the disk holding the data folder's payloads/")
            if not self._dirty or self._fd is None or self._segment not in segments:
                return  # what is not open any more was synced when it was closed
            try:
                _sync(self._fd)
            except OSError as exc:
                self._lost.add(self._segment)  # every transaction that wrote it fails
                self._dirty = False
                self._retire()
                raise _error("sync", exc) from exc
            self.syncs += 1
            self._dirty = False
            self._drop_cached()
            if self._size >= self.limit:
                self._retire()

    def release(self, segments: set[int]) -> None:
        """A transaction that appended to ``segments`` has ended (committed or not)."""
        with self._lock:
            self._held.subtract(segments)
            for seg in segments:
                if self._held[seg] <= 0:
                    del self._held[seg]

    def busy(self) -> set[int]:
        """Segments the sweep must keep whatever the committed rows say."""
        with self._lock:
            return set(self._held) | ({self._segment} if self._fd is not None else set())

    def read(self, location: Location) -> bytes:
        try:
            fd = os.open(self.path(location.segment), os.O_RDONLY)
        except OSError as exc:
            raise _error("open", exc) from exc
        try:
            data = os.pread(fd, location.length, location.offset)
        except OSError as exc:
            raise _error("read", exc) from exc
        finally:
            os.close(fd)
        if len(data) != location.length:
            raise StoreError(f"queue payload file {self.path(location.segment).name} is shorter "
                             "than its rows say", hint="restore the data folder from a backup")
        return data

    def segments(self) -> list[int]:
        """Segment numbers on disk, oldest first."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        return sorted(int(n[:-len(SUFFIX)]) for n in names
                      if n.endswith(SUFFIX) and n[:-len(SUFFIX)].isdigit())

    def remove(self, segment: int) -> None:
        """Delete a closed segment that no row names (the open or a held one never is)."""
        with self._lock:
            if segment == self.current or segment in self._held:
                return
            try:
                os.unlink(self.path(segment))
            except FileNotFoundError:
                pass

    def close_if_idle(self) -> None:
        """Close the open segment after ``idle_close`` seconds without an append, so that a
        quiet hub does not keep up to ``limit`` bytes of finished mail for ever."""
        with self._lock:
            if self._fd is not None and time.monotonic() - self._last_append >= self.idle_close:
                self._retire()

    def close(self) -> None:
        with self._lock:
            self._retire()

    def _drop_cached(self) -> None:
        """Let the page cache go of what was just synced. The senders get fresh payloads from
        memory, so these pages are read again only after a restart or a retry; kept, they grew
        the cache by every payload written, each write landing on memory not touched before.
        On a VM that hands free memory back to its host that is a fault per page: the commit
        thread's CPU for a 200 KiB message rose from 0.6 to 1.2 ms as the cache grew."""
        if _DONTNEED is None or self._fd is None or self._size <= self._dropped:
            return
        start = self._dropped - self._dropped % _PAGE  # the partial page of the last drop too
        try:
            os.posix_fadvise(self._fd, start, self._size - start, _DONTNEED)
        except OSError:
            return  # only advice: the data is on disk either way
        self._dropped = self._size

    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        existing = self.segments()
        # microseconds, and always past every segment on disk: a number is never reused
        segment = max(time.time_ns() // 1000, existing[-1] + 1 if existing else 0,
                      self._segment + 1)
        path = self.path(segment)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            fsync_dir(self.folder)  # the new name is durable before any row names it
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self._fd, self._segment, self._size, self._dirty = fd, segment, 0, False
        self._dropped = 0

    def _retire(self) -> None:
        """Close the open segment; appends not yet synced are synced first (rows of a
        transaction in progress may name them); if that fails, so do those transactions."""
        if self._fd is not None:
            if self._dirty:
                try:
                    _sync(self._fd)
                except OSError:
                    self._lost.add(self._segment)
                else:
                    self._drop_cached()
            os.close(self._fd)
            self._fd = None
        self._dirty = False


@event.listens_for(Session, "before_commit")
def _sync_appended(session: Session) -> None:
    """Every segment appended to in this transaction is fsync'd before the commit."""
    for files, segments in session.info.get(_APPENDED, {}).items():
        files.sync(segments)


@event.listens_for(Session, "after_transaction_end")
def _release_appended(session: Session, transaction: SessionTransaction) -> None:
    """The outermost transaction ended: its segments are no longer held (a savepoint's end
    changes nothing; bytes of rows rolled back are named by nothing)."""
    if transaction.parent is None:
        for files, segments in session.info.pop(_APPENDED, {}).items():
            files.release(segments)


_SET_LOCATION = (update(_P).where(_P.c.id == bindparam("pid"))
                 .values(sealed=b"", segment=bindparam("seg"), seg_offset=bindparam("off"),
                         seg_length=bindparam("len")))
_NAMED = select(_P.c.id).where(_P.c.segment == bindparam("seg")).limit(1)
_IN_SEGMENT = (select(_P.c.id, _P.c.seg_offset, _P.c.seg_length)
               .where(_P.c.segment == bindparam("seg")).limit(bindparam("limit")))
_INLINE = (update(_P).where(_P.c.id == bindparam("pid"))
           .values(sealed=bindparam("blob"), segment=None, seg_offset=None, seg_length=None))


def store_large(session: Session, files: PayloadFiles,
                sealed: dict[int, bytes]) -> dict[int, bytes]:
    """Append the large ones of ``sealed`` (payload id -> bytes) and point their rows at them;
    returns the rest, which stay in their rows."""
    inline: dict[int, bytes] = {}
    located: list[dict[str, int]] = []
    for pid, blob in sealed.items():
        if files.wants(len(blob)):
            loc = files.append(session, blob)
            located.append({"pid": pid, "seg": loc.segment, "off": loc.offset,
                            "len": loc.length})
        else:
            inline[pid] = blob
    if located:
        session.execute(_SET_LOCATION, located)
    return inline


def dead_segments(session: Session, files: PayloadFiles) -> list[int]:
    """Closed segments that no payload row names (delete them once this has committed); the
    open one is closed first when it has been idle."""
    files.close_if_idle()
    busy = files.busy()
    return [seg for seg in files.segments()
            if seg not in busy and session.execute(_NAMED, {"seg": seg}).first() is None]


def compact(session: Session, files: PayloadFiles, older_than_us: int, limit: int = 50) -> int:
    """Move the payloads still in closed segments created before ``older_than_us`` (epoch
    microseconds) into their rows, at most ``limit``: an old segment is then let go."""
    moved = 0
    busy = files.busy()
    for seg in files.segments():
        if seg >= older_than_us or moved >= limit:
            break
        if seg in busy:
            continue
        rows = session.execute(_IN_SEGMENT, {"seg": seg, "limit": limit - moved}).all()
        try:
            inline = [{"pid": int(r.id), "blob": files.read(
                Location(seg, int(r.seg_offset), int(r.seg_length)))} for r in rows]
        except StoreError as exc:  # one damaged segment must not stop the sweep
            log.error("payload segment %s cannot be compacted: %s", seg, exc)
            continue
        if inline:
            session.execute(_INLINE, inline)
        moved += len(inline)
    return moved
