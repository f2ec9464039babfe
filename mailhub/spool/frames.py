"""The on-disk format of spool segments and done-marks: pure functions over bytes.

A segment starts with ``SEGMENT_MAGIC`` and holds records, each a small plaintext frame followed
by the sealed blob (AES-GCM at rest, the spool id as associated data)::

    magic b"MHR1" | spool id length (1) | blob length (4) | blob CRC32 (4) | frame CRC32 (4)
    | spool id (ASCII) | sealed blob

all integers big-endian. The frame CRC covers the frame's fields and the spool id, so a reader
can walk the frames without reading the blobs and still tell a torn or garbled tail from a
record; the blob CRC lets recovery tell a record whose blob never reached the disk. A done-mark
is one line ``<record offset> <spool id>\\n`` in the segment's ``.done`` file.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Literal

SEGMENT_MAGIC = b"MHSPOOL1"
RECORD_MAGIC = b"MHR1"
_HEAD = struct.Struct(">4sBIII")
HEAD_LEN = _HEAD.size
_CRC_SPAN = HEAD_LEN - 4  # the frame CRC covers everything before itself, then the spool id
MAX_ID_LEN = 255

Stop = Literal["end", "short", "corrupt", "more"]


@dataclass(frozen=True, slots=True)
class Frame:
    """Where one record sits in its segment."""

    offset: int
    spool_id: str
    blob_len: int
    blob_crc: int

    @property
    def blob_offset(self) -> int:
        return self.offset + HEAD_LEN + len(self.spool_id)

    @property
    def end(self) -> int:
        return self.blob_offset + self.blob_len


def record_head(spool_id: bytes, blob: bytes) -> tuple[bytes, int]:
    """The frame (with the spool id) to write before `blob`, and the blob's CRC."""
    blob_crc = zlib.crc32(blob)
    fields = _HEAD.pack(RECORD_MAGIC, len(spool_id), len(blob), blob_crc, 0)[:_CRC_SPAN]
    head_crc = zlib.crc32(spool_id, zlib.crc32(fields))
    return fields + head_crc.to_bytes(4, "big") + spool_id, blob_crc


def parse_frames(buf: bytes, base: int, size: int) -> tuple[list[Frame], int, Stop]:
    """Walk the frames in `buf` (the file's bytes from offset `base`; the file is `size` long).

    Returns the complete records found, the offset where parsing stopped, and why: ``end`` (the
    file ends exactly there), ``short`` (a record runs past the end of the file: being written,
    or torn by a crash), ``corrupt`` (not a valid frame) or ``more`` (read on from that offset;
    the buffer ended, or a blob was skipped).
    """
    frames: list[Frame] = []
    i = 0
    have = len(buf)
    while True:
        pos = base + i
        if pos >= size:
            return frames, pos, "end"
        if i + HEAD_LEN > have:
            return frames, pos, "short" if pos + HEAD_LEN > size else "more"
        magic, id_len, blob_len, blob_crc, head_crc = _HEAD.unpack_from(buf, i)
        if magic != RECORD_MAGIC:
            return frames, pos, "corrupt"
        id_end = i + HEAD_LEN + id_len
        if id_end > have:
            return frames, pos, "short" if pos + HEAD_LEN + id_len > size else "more"
        raw_id = bytes(buf[i + HEAD_LEN : id_end])
        if zlib.crc32(raw_id, zlib.crc32(buf[i : i + _CRC_SPAN])) != head_crc:
            return frames, pos, "corrupt"
        try:
            spool_id = raw_id.decode("ascii")
        except UnicodeDecodeError:
            return frames, pos, "corrupt"
        frame = Frame(pos, spool_id, blob_len, blob_crc)
        if frame.end > size:
            return frames, pos, "short"
        frames.append(frame)
        i = frame.end - base
        if i > have:
            return frames, frame.end, "more"


def blob_ok(frame: Frame, blob: bytes) -> bool:
    return len(blob) == frame.blob_len and zlib.crc32(blob) == frame.blob_crc


def done_line(offset: int, spool_id: str) -> bytes:
    return f"{offset} {spool_id}\n".encode("ascii")


def parse_done(data: bytes) -> tuple[list[tuple[int, str]], int]:
    """Done-marks in `data` and how many bytes they used (a torn last line waits for more)."""
    marks: list[tuple[int, str]] = []
    used = data.rfind(b"\n") + 1
    for line in data[:used].split(b"\n"):
        offset, _, sid = line.partition(b" ")
        if offset.isdigit() and sid:
            marks.append((int(offset), sid.decode("ascii", "replace")))
    return marks, used
