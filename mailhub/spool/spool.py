"""The durable spool: a message is acknowledged only after it is sealed and fsync'd here.

Each accepted message becomes one file, ``<dir>/<listener>/<id>.msg``: the envelope and the raw
message, sealed with the at-rest key (AES-256-GCM, the spool id as associated data), written to a
temporary name, fsync'd, renamed into place and the directory fsync'd. A file stays until the
message's next state (queue rows, case filing) is committed; on start-up every file left is
processed again, which is safe because that next step is idempotent on the spool id.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from mailhub.crypto.atrest import fsync_dir
from mailhub.errors import StoreError

LISTENERS = ("submission", "inbound", "scheduler", "imap")


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
    content: bytes


def new_spool_id() -> str:
    """Sortable by time, unique without coordination between processes or instances."""
    return f"{time.time_ns():x}-{secrets.token_hex(5)}"


class DirSync:
    """Makes renames in one directory durable, one fsync for every rename made before it began.

    Concurrent sessions each rename a file into place and then need the directory synced; a
    caller waits for a sync that *started* after its rename (the one running may have missed
    it), and whoever finds none running starts one for everybody waiting.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cond = threading.Condition()
        self._started = 0
        self._done = 0
        self._running = False

    def sync(self) -> None:
        with self._cond:
            target = self._started + 1
            while self._done < target:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                self._started += 1
                generation = self._started
                self._cond.release()
                try:
                    fsync_dir(self.path)
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
                self._done = max(self._done, generation)


def durable_write(path: Path, data: bytes, dir_sync: DirSync | None = None) -> None:
    """Write atomically and durably: temp file, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if dir_sync is not None:
        dir_sync.sync()
    else:
        fsync_dir(path.parent)


class Spool:
    """Sealed, fsync'd message files, one folder per listener."""

    def __init__(self, root: Path, sealer: Sealer) -> None:
        self.root = Path(root)
        self.sealer = sealer
        self._dir_syncs: dict[str, DirSync] = {}
        for name in LISTENERS:
            (self.root / name).mkdir(parents=True, exist_ok=True, mode=0o700)
            self._dir_syncs[name] = DirSync(self.root / name)

    def _path(self, listener: str, spool_id: str) -> Path:
        if listener not in LISTENERS or not spool_id.replace("-", "").isalnum():
            raise StoreError(f"bad spool reference {listener}/{spool_id}")
        return self.root / listener / f"{spool_id}.msg"

    def accept(self, envelope: Envelope, content: bytes, spool_id: str | None = None) -> str:
        """Seal and durably store a message; return its spool id. Blocking: run in a thread."""
        sid = spool_id or new_spool_id()
        header = json.dumps(asdict(envelope), separators=(",", ":")).encode()
        blob = struct.pack(">I", len(header)) + header + content
        try:
            durable_write(self._path(envelope.listener, sid), self.sealer.seal(blob, sid.encode()),
                          self._dir_syncs[envelope.listener])
        except OSError as exc:
            raise StoreError(f"cannot write to the spool: {exc.strerror}",
                             hint=f"check free space and permissions of {self.root}") from exc
        return sid

    def load(self, listener: str, spool_id: str) -> SpooledMessage:
        blob = self.sealer.open(self._path(listener, spool_id).read_bytes(), spool_id.encode())
        (hlen,) = struct.unpack(">I", blob[:4])
        env = json.loads(blob[4 : 4 + hlen])
        return SpooledMessage(spool_id, Envelope(**env), blob[4 + hlen :])

    def pending(self, listener: str) -> list[str]:
        """Spool ids still waiting in a listener's folder, oldest first."""
        folder = self.root / listener
        return sorted(p.stem for p in folder.glob("*.msg"))

    def remove(self, listener: str, spool_id: str) -> None:
        try:
            self._path(listener, spool_id).unlink()
        except FileNotFoundError:
            pass
