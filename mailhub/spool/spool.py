"""The durable spool: a message is acknowledged only after it is sealed and fsync'd here.

Each accepted message is one record appended to this process's segment of its listener's folder
(``<dir>/<listener>/*.seg``, see journal.py): the envelope and the raw message, sealed with the
at-rest key (AES-256-GCM, the spool id as associated data), behind a small frame. Concurrent
accepts share their fsyncs. A record stays pending until the message's next state (queue rows,
case filing) is committed and ``remove`` marks it done; on start-up every pending record is
processed again, which is safe because that next step is idempotent on the spool id. Several
processes may write the same folder (the submission children) and one reads them all (the
parent): see index.py. Files of the old one-file-per-message layout (``<id>.msg``) are still
read, listed and removed, so an upgrade loses nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mailhub.crypto.atrest import write_durable
from mailhub.errors import StoreError
from mailhub.spool.frames import MAX_ID_LEN
from mailhub.spool.index import ListenerIndex
from mailhub.spool.journal import IDLE_CLOSE, SegmentWriter

log = logging.getLogger("mailhub.spool")

LISTENERS = ("submission", "inbound", "scheduler", "imap")
SEGMENT_LIMIT = 64 * 1024 * 1024
SHUNT = "shunt"


class Sealer(Protocol):
    def seal(self, plaintext: bytes, aad: bytes = b"") -> bytes: ...
    def open(self, blob: bytes, aad: bytes = b"") -> bytes: ...


@dataclass
class Envelope:
    """What the SMTP session told us, kept with the message."""

    mail_from: str
    rcpt_tos: list[str]
    listener: str
    peer: str = ""
    auth_user: str = ""
    tls: bool = False
    smtputf8: bool = False
    received_at: float = field(default_factory=time.time)
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class SpooledMessage:
    spool_id: str
    envelope: Envelope
    content: bytes = field(repr=False)  # the message itself: never in logs or tracebacks


def new_spool_id() -> str:
    """Sortable by time, unique without coordination between processes or instances."""
    return f"{time.time_ns():x}-{secrets.token_hex(5)}"


def valid_spool_id(spool_id: str) -> bool:
    """ASCII letters, digits and dashes: safe in file names, frames and done-marks."""
    return (0 < len(spool_id) <= MAX_ID_LEN and spool_id.isascii()
            and spool_id.replace("-", "").isalnum())


def pack_message(envelope: Envelope, content: bytes) -> bytes:
    """The plaintext that gets sealed: envelope JSON (length-prefixed), then the message."""
    header = json.dumps(vars(envelope), separators=(",", ":")).encode()
    return struct.pack(">I", len(header)) + header + content


def unpack_message(spool_id: str, plain: bytes) -> SpooledMessage:
    (hlen,) = struct.unpack(">I", plain[:4])
    return SpooledMessage(spool_id, Envelope(**json.loads(plain[4 : 4 + hlen])), plain[4 + hlen :])


class Spool:
    """Sealed, fsync'd messages, one folder of segments per listener."""

    def __init__(self, root: Path | str, sealer: Sealer, *,
                 segment_limit: int = SEGMENT_LIMIT, idle_close: float = IDLE_CLOSE) -> None:
        self.root = Path(root)
        self.sealer = sealer
        self.segment_limit = segment_limit
        self.idle_close = idle_close
        self._indexes: dict[str, ListenerIndex] = {}
        self._writers: dict[str, SegmentWriter] = {}
        self._writers_lock = threading.Lock()
        self._legacy: set[str] = set()  # listeners whose folder held old <id>.msg files
        for name in LISTENERS:
            folder = self.root / name
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._indexes[name] = ListenerIndex(folder)
            if any(folder.glob("*.msg")):
                self._legacy.add(name)

    # ---- writing

    def accept(self, envelope: Envelope, content: bytes, spool_id: str | None = None) -> str:
        """Seal and durably store a message; return its spool id. Blocking (waits for fsync)."""
        sid, writer, blob = self._prepare(envelope, content, spool_id)
        writer.wait(writer.append(sid, blob))
        return sid

    async def accept_async(self, envelope: Envelope, content: bytes,
                           spool_id: str | None = None) -> str:
        """As `accept`, for the event loop: appends inline, then awaits the shared fsync."""
        sid, writer, blob = self._prepare(envelope, content, spool_id)
        ticket = writer.append(sid, blob, asyncio.get_running_loop())
        assert ticket.future is not None
        await ticket.future
        return sid

    def _prepare(self, envelope: Envelope, content: bytes,
                 spool_id: str | None) -> tuple[str, SegmentWriter, bytes]:
        sid = spool_id or new_spool_id()
        self._check(envelope.listener, sid)
        blob = self.sealer.seal(pack_message(envelope, content), sid.encode())
        return sid, self._writer(envelope.listener), blob

    def _writer(self, listener: str) -> SegmentWriter:
        writer = self._writers.get(listener)
        if writer is None:
            with self._writers_lock:
                writer = self._writers.get(listener)
                if writer is None:
                    writer = self._writers[listener] = SegmentWriter(
                        self.root / listener, self._indexes[listener], self.segment_limit,
                        self.idle_close)
        return writer

    @property
    def fsync_count(self) -> int:
        """fsync rounds run by this process's writers (each covers every append before it)."""
        return sum(w.fsync_count for w in list(self._writers.values()))

    def close(self) -> None:
        """Sync and close this process's segments (finished ones are then deleted)."""
        with self._writers_lock:
            writers, self._writers = list(self._writers.values()), {}
        for writer in writers:
            writer.close()
        for index in self._indexes.values():
            index.close()

    # ---- reading and finishing

    def load(self, listener: str, spool_id: str) -> SpooledMessage:
        """The message; FileNotFoundError if it is not (or no longer) pending."""
        blob = self._read(listener, spool_id)
        return unpack_message(spool_id, self.sealer.open(blob, spool_id.encode()))

    def pending(self, listener: str) -> list[str]:
        """Spool ids still waiting in a listener's folder, oldest first (by id)."""
        ids = self._indexes[listener].pending() if listener in self._indexes else []
        if listener in self._legacy:
            ids = sorted(set(ids) | {p.stem for p in (self.root / listener).glob("*.msg")})
        return ids

    def pending_count(self, listener: str) -> int:
        return len(self.pending(listener))

    def contains(self, listener: str, spool_id: str) -> bool:
        """Whether `spool_id` is spooled and not yet removed (as far as this process knows)."""
        self._check(listener, spool_id)
        if self._indexes[listener].contains(spool_id):
            return True
        return listener in self._legacy and self._legacy_path(listener, spool_id).exists()

    def remove(self, listener: str, spool_id: str) -> None:
        """Mark the message done (after its next state is committed). Idempotent."""
        self._check(listener, spool_id)
        try:
            self._indexes[listener].mark_done(spool_id)
        except OSError as exc:
            raise StoreError(f"cannot mark spooled message {spool_id} done: {exc.strerror}",
                             hint=f"check free space and permissions of {self.root}") from exc
        if listener in self._legacy:
            self._legacy_path(listener, spool_id).unlink(missing_ok=True)

    def shunt(self, listener: str, spool_id: str) -> Path | None:
        """Set a message that keeps failing aside, still sealed (never dropped): a durable copy
        in ``<root>/shunt/<listener>-<id>.msg``, then it is no longer pending."""
        try:
            blob = self._read(listener, spool_id)
        except FileNotFoundError:
            return None
        folder = self.root / SHUNT
        folder.mkdir(exist_ok=True, mode=0o700)
        target = folder / f"{listener}-{spool_id}.msg"
        write_durable(target, blob)
        self.remove(listener, spool_id)
        return target

    # ---- internals

    def _check(self, listener: str, spool_id: str) -> None:
        if listener not in LISTENERS or not valid_spool_id(spool_id):
            raise StoreError(f"bad spool reference {listener}/{spool_id}")

    def _legacy_path(self, listener: str, spool_id: str) -> Path:
        return self.root / listener / f"{spool_id}.msg"

    def _read(self, listener: str, spool_id: str) -> bytes:
        self._check(listener, spool_id)
        blob = self._indexes[listener].read(spool_id)
        if blob is None and listener in self._legacy:
            blob = self._legacy_path(listener, spool_id).read_bytes()  # FileNotFoundError
        if blob is None:
            raise FileNotFoundError(f"spool {listener}/{spool_id} is not pending")
        return blob
