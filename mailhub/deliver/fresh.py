"""Fresh payloads handed from the pipeline to the senders in memory.

A row queued a moment ago is claimed a moment later, and without this its payload would be read
back from the database and unsealed again: for a 200 KiB OpenPGP message that read (the bytes
come back through SQLite's overflow pages) and the AES-GCM open cost about as much as writing
them did. The pipeline puts the exact bytes it stored here once their transaction has
committed, and the claim takes them out.

What makes this safe: an entry is keyed by the queue row *and* its payload id, both committed
with these very bytes, and it is taken at most once; anything not found (after a restart, a
retry, an entry pushed out by the size or age bound, a row another instance claimed) is read
from the database as before. The bounds keep a stalled next hop from holding messages in memory.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Opened:
    """A payload that needs no unsealing: the bytes the pipeline stored."""

    data: bytes = field(repr=False)  # a message: never in logs or tracebacks


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A payload whose file could not be read at the claim: its row is retried later."""

    reason: str


class FreshPayloads:
    """A bounded, thread-safe map (row id, payload id) -> the row's stored bytes."""

    def __init__(self, max_bytes: int = 64 << 20, max_age: float = 30.0) -> None:
        self.max_bytes = max_bytes
        self.max_age = max_age
        self._items: OrderedDict[tuple[int, int], tuple[float, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def put_many(self, entries: list[tuple[int, int, bytes]]) -> None:
        """Remember (row id, payload id, bytes) of rows whose transaction has committed."""
        if not entries or self.max_bytes <= 0:
            return
        now = time.monotonic()
        with self._lock:
            for row_id, payload_id, data in entries:
                if len(data) > self.max_bytes:
                    continue
                self._items[(row_id, payload_id)] = (now, data)
                self._bytes += len(data)
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._items:
            key, (at, data) = next(iter(self._items.items()))
            if self._bytes <= self.max_bytes and now - at <= self.max_age:
                return
            del self._items[key]
            self._bytes -= len(data)

    def take(self, row_id: int, payload_id: int) -> bytes | None:
        """The bytes of that row, once; None when they must be read from the database."""
        with self._lock:
            hit = self._items.pop((row_id, payload_id), None)
            if hit is None:
                return None
            self._bytes -= len(hit[1])
            if time.monotonic() - hit[0] > self.max_age:
                return None
            return hit[1]


# sealed bytes from the database, the stored bytes themselves, or why they could not be read
WirePayload = bytes | Opened | Unreadable

_PENDING = "mailhub.fresh"  # session.info key: this transaction's entries, not committed yet
AFTER_COMMIT = "mailhub.after_commit"  # session.info key: callables GroupCommit runs after it


def remember(info: dict[str, object], fresh: FreshPayloads,
             entries: list[tuple[int, int, bytes]]) -> None:
    """Note rows written in this transaction: a claim in the same transaction takes them from
    here, and what is left goes to ``fresh`` once the transaction has committed."""
    if not entries:
        return
    pending = info.get(_PENDING)
    if not isinstance(pending, dict):
        pending = info[_PENDING] = {}
        hooks = info.setdefault(AFTER_COMMIT, [])
        assert isinstance(hooks, list)
        hooks.append(lambda: fresh.put_many([(r, p, d) for (r, p), d in pending.items()]))
    for row_id, payload_id, data in entries:
        pending[(row_id, payload_id)] = data


def take_claimed(info: dict[str, object], fresh: FreshPayloads,
                 claimed: list[tuple[int, int]]) -> dict[int, Opened]:
    """Payload id -> stored bytes for the claimed (row id, payload id) pairs found in memory."""
    pending = info.get(_PENDING)
    out: dict[int, Opened] = {}
    for key in claimed:
        data = pending.pop(key, None) if isinstance(pending, dict) else None
        if data is None:
            data = fresh.take(*key)
        if data is not None:
            out[key[1]] = Opened(data)
    return out
