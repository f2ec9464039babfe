"""What one listener's segments hold: records found, done-marks, and deleting finished segments.

Every process keeps its own index. Records this process appends are noted as they are written;
records other processes append (the submission children) are found by scanning segments
incrementally from where the last scan stopped, walking the frames and skipping the blobs.

A segment is *closed* once no process holds it open for writing: its writer keeps an exclusive
``flock`` on it while appending, released when it rotates, closes, exits or is killed, so a
shared lock that succeeds proves nobody can append any more. Only then is a torn tail reported
(a crash mid-write: that record was never acknowledged) and only then may a segment whose
records are all marked done be deleted, together with its ``.done`` file.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from pathlib import Path

from mailhub.errors import StoreError
from mailhub.spool.frames import SEGMENT_MAGIC, Frame, blob_ok, done_line, parse_done, parse_frames

log = logging.getLogger("mailhub.spool")

CHUNK = 256 * 1024
RETRY_EVERY = 1.0  # seconds between checks whether finished segments' writers are gone
STALE_TMP = 60.0  # a half-created segment older than this belongs to a dead writer
SEGMENT_SUFFIX = ".seg"
DONE_SUFFIX = ".done"


def writer_gone(fd: int) -> bool:
    """True when no process holds the segment open for writing (closed, exited or killed)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


class Segment:
    """This process's view of one segment file."""

    __slots__ = ("name", "path", "done_path", "fd", "done_fd", "scanned", "records", "done",
                 "finished", "done_read", "closed", "own", "bad")

    def __init__(self, folder: Path, name: str, fd: int) -> None:
        self.name = name
        self.path = folder / name
        self.done_path = folder / (name[: -len(SEGMENT_SUFFIX)] + DONE_SUFFIX)
        self.fd = fd
        self.done_fd: int | None = None
        self.scanned = 0  # offset of the next frame to read; 0 until the header is checked
        self.records: dict[int, Frame] = {}
        self.done: set[int] = set()  # offsets marked done (read before their record, maybe)
        self.finished = 0  # records whose offset is in `done`
        self.done_read = 0
        self.closed = False
        self.own = False  # this process's writer still appends to it
        self.bad = False  # not a spool segment: left alone

    def all_done(self) -> bool:
        return self.finished == len(self.records)

    def add_done(self, offset: int) -> bool:
        """Note a done-mark; False if it was known already."""
        if offset in self.done:
            return False
        self.done.add(offset)
        if offset in self.records:
            self.finished += 1
        return True

    def close_fds(self) -> None:
        for fd in (self.fd, self.done_fd):
            if fd is not None:
                os.close(fd)
        self.done_fd = None


class ListenerIndex:
    """Records of one listener folder that are not done yet, by spool id. Thread-safe."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.lock = threading.Lock()
        self._segs: dict[str, Segment] = {}
        self._live: dict[str, list[tuple[Segment, Frame]]] = {}
        self._waiting: set[str] = set()  # all done, but perhaps still being written
        self._next_retry = 0.0

    # ---- hooks for this process's writer

    def add_own(self, name: str) -> None:
        """A segment this process's writer just created (header written, nothing else)."""
        with self.lock:
            seg = self._open(name)
            if seg is not None:
                seg.own = True
                seg.scanned = len(SEGMENT_MAGIC)

    def note(self, name: str, frame: Frame) -> None:
        """A record this process appended (not yet fsync'd: nobody is told of it before)."""
        with self.lock:
            seg = self._segs[name]
            self._add(seg, frame)
            seg.scanned = frame.end

    def own_closed(self, name: str) -> None:
        """The writer fsync'd and closed the segment: it is deleted as soon as all is done."""
        with self.lock:
            seg = self._segs.get(name)
            if seg is not None:
                seg.own = False
                seg.closed = True
                if seg.all_done():
                    self._try_delete(seg)

    # ---- readers

    def read(self, spool_id: str) -> bytes | None:
        """The sealed blob of the newest live record of `spool_id`, or None."""
        with self.lock:
            found = self._locate(spool_id)
            if found is None:
                return None
            seg, frame = found
            blob = os.pread(seg.fd, frame.blob_len, frame.blob_offset)
        if not blob_ok(frame, blob):
            raise StoreError(f"spool record {spool_id} in {seg.path} is damaged",
                             hint="the file system lost data; restore the spool from backup")
        return blob

    def contains(self, spool_id: str) -> bool:
        with self.lock:
            return self._locate(spool_id) is not None

    def pending(self) -> list[str]:
        """Spool ids with a record not marked done, in any segment (a full look at the folder)."""
        with self.lock:
            self._refresh(full=True)
            return sorted(self._live)

    def mark_done(self, spool_id: str) -> bool:
        """Append done-marks for every live record of `spool_id`; False if there was none."""
        with self.lock:
            if self._locate(spool_id) is None:
                return False
            for seg, frame in self._live.pop(spool_id):
                if seg.done_fd is None:
                    seg.done_fd = os.open(seg.done_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                                          | os.O_CLOEXEC, 0o600)
                os.write(seg.done_fd, done_line(frame.offset, spool_id))
                seg.add_done(frame.offset)
                if not seg.own and seg.all_done():
                    self._try_delete(seg)  # caught up: it goes if its writer has finished
            return True

    def close(self) -> None:
        with self.lock:
            for seg in self._segs.values():
                seg.close_fds()
            self._segs.clear()
            self._live.clear()

    # ---- internals (the lock is held)

    def _add(self, seg: Segment, frame: Frame) -> None:
        if frame.offset in seg.records:
            return
        seg.records[frame.offset] = frame
        if frame.offset in seg.done:
            seg.finished += 1
        else:
            self._live.setdefault(frame.spool_id, []).append((seg, frame))

    def _locate(self, spool_id: str) -> tuple[Segment, Frame] | None:
        found = self._live.get(spool_id)
        if not found:
            self._refresh(full=False, want=spool_id)
            found = self._live.get(spool_id)
        return found[-1] if found else None

    def _open(self, name: str) -> Segment | None:
        try:
            fd = os.open(self.folder / name, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None  # deleted meanwhile by another process
        seg = self._segs[name] = Segment(self.folder, name, fd)
        return seg

    def _refresh(self, *, full: bool, want: str | None = None) -> None:
        """Catch up with other processes: new records in known segments, then new segments;
        with `full`, also their done-marks, vanished segments and the clean-up."""
        for seg in list(self._segs.values()):
            if not seg.own and not seg.closed:
                if full and writer_gone(seg.fd):
                    seg.closed = True
                self._scan(seg)
        if want is None or want not in self._live:
            self._discover(full)
        if full:
            for seg in list(self._segs.values()):
                self._read_done(seg)
                if seg.closed and seg.all_done():
                    self._try_delete(seg)
        elif self._waiting and time.monotonic() >= self._next_retry:
            self._next_retry = time.monotonic() + RETRY_EVERY
            for name in list(self._waiting):
                seg = self._segs.get(name)
                if seg is None:
                    self._waiting.discard(name)
                else:
                    self._try_delete(seg)

    def _discover(self, full: bool) -> None:
        names = os.listdir(self.folder)
        segments = {n for n in names if n.endswith(SEGMENT_SUFFIX) and not n.startswith(".")}
        for name in sorted(segments - self._segs.keys()):
            seg = self._open(name)
            if seg is not None:
                seg.closed = full and writer_gone(seg.fd)
                self._scan(seg)
        if full:
            for name in [n for n, s in self._segs.items() if n not in segments and not s.own]:
                self._forget(self._segs[name])
            self._clean_leftovers(names, segments)

    def _scan(self, seg: Segment) -> None:
        """Read the frames appended since the last scan. Blobs are skipped, except once the
        writer is gone: then each is checked, as the tail may be torn by a crash."""
        if seg.own or seg.bad:
            return
        size = os.fstat(seg.fd).st_size
        if seg.scanned == 0:
            if size < len(SEGMENT_MAGIC):
                return  # header not written yet (or a writer died at once: empty)
            if os.pread(seg.fd, len(SEGMENT_MAGIC), 0) != SEGMENT_MAGIC:
                log.warning("%s is not a spool segment; left alone", seg.path)
                seg.bad = True
                return
            seg.scanned = len(SEGMENT_MAGIC)
        pos = seg.scanned
        while pos < size:
            start = pos
            buf = os.pread(seg.fd, CHUNK, start)
            frames, pos, stop = parse_frames(buf, start, size)
            for frame in frames:
                if seg.closed and not self._blob_checks(seg, frame, buf, start, size):
                    stop = "short"
                    break
                self._add(seg, frame)
                seg.scanned = frame.end
            if stop != "more":
                break
        if seg.closed and seg.scanned < size:
            log.warning("spool segment %s: ignoring %d bytes after offset %d, an incomplete "
                        "record (a crash while writing it; it was never acknowledged)",
                        seg.path, size - seg.scanned, seg.scanned)
            seg.scanned = size

    def _blob_checks(self, seg: Segment, frame: Frame, buf: bytes, base: int,
                     size: int) -> bool:
        """False for a torn last record; a damaged record elsewhere is kept (and fails to load,
        so it ends up shunted rather than silently dropped)."""
        start = frame.blob_offset - base
        blob = (buf[start : start + frame.blob_len] if start + frame.blob_len <= len(buf)
                else os.pread(seg.fd, frame.blob_len, frame.blob_offset))
        if blob_ok(frame, blob):
            return True
        if frame.end >= size:
            return False
        log.warning("spool segment %s: record %s at offset %d is damaged", seg.path,
                    frame.spool_id, frame.offset)
        return True

    def _read_done(self, seg: Segment) -> None:
        """Done-marks other processes appended since the last look."""
        try:
            fd = os.open(seg.done_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            data = os.pread(fd, max(0, os.fstat(fd).st_size - seg.done_read), seg.done_read)
        finally:
            os.close(fd)
        marks, used = parse_done(data)
        seg.done_read += used
        for offset, sid in marks:
            if not seg.add_done(offset):
                continue
            live = self._live.get(sid)
            if live:
                kept = [(s, f) for s, f in live if not (s is seg and f.offset == offset)]
                if kept:
                    self._live[sid] = kept
                else:
                    del self._live[sid]

    def _try_delete(self, seg: Segment) -> None:
        """Delete a segment nobody writes any more whose records are all done."""
        if seg.own or seg.bad:
            return
        if not seg.closed:
            if not writer_gone(seg.fd):
                self._waiting.add(seg.name)
                return
            seg.closed = True
        self._waiting.discard(seg.name)
        self._scan(seg)
        self._read_done(seg)
        if not seg.all_done():
            return
        seg.path.unlink(missing_ok=True)
        seg.done_path.unlink(missing_ok=True)
        log.debug("spool segment %s finished (%d records) and deleted", seg.name,
                  len(seg.records))
        self._forget(seg)

    def _forget(self, seg: Segment) -> None:
        for offset, frame in seg.records.items():
            if offset not in seg.done:
                live = [(s, f) for s, f in self._live.get(frame.spool_id, []) if s is not seg]
                if live:
                    self._live[frame.spool_id] = live
                else:
                    self._live.pop(frame.spool_id, None)
        seg.close_fds()
        del self._segs[seg.name]
        self._waiting.discard(seg.name)

    def _clean_leftovers(self, names: list[str], segments: set[str]) -> None:
        """Done files whose segment is gone (a crash between the two unlinks), and segments
        that a writer that died never finished creating."""
        now = time.time()
        for name in names:
            path = self.folder / name
            if name.endswith(DONE_SUFFIX):
                if name[: -len(DONE_SUFFIX)] + SEGMENT_SUFFIX not in segments:
                    path.unlink(missing_ok=True)
            elif name.startswith(".") and name.endswith(".tmp"):
                try:
                    if now - path.stat().st_mtime > STALE_TMP:
                        path.unlink()
                except FileNotFoundError:
                    pass

