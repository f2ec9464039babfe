"""The AUTH failure throttle shared by every submission process.

The submission port is served by several processes on one listening socket, and the kernel
hands each new connection to whichever of them accepts first. With a count per process, a
client guessing passwords got as many free failures, and as short delays, as there were
processes. Here the counts live in shared memory that the parent creates and every child maps:
a fixed table of slots chosen by a hash of the client address (so memory is bounded under a
spray of addresses: a new address takes over its slot), guarded by one lock that
``FailureThrottle`` holds around each read-and-write.
"""

from __future__ import annotations

import hashlib
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from multiprocessing.context import BaseContext
from typing import Any

from mailhub.ingress.auth import FailureThrottle

SLOTS = 4096


@dataclass(frozen=True)
class FailureTable:
    """Shared arrays: per slot the address's hash (0: empty), its failure count, the last one,
    and when its last AUTH's turn came (``FailureThrottle.delay_for``)."""

    keys: Any  # RawArray('q')
    counts: Any  # RawArray('q')
    lasts: Any  # RawArray('d'), time.monotonic() (one clock for every process on the host)
    turns: Any  # RawArray('d'), time.monotonic()
    lock: Any

    @classmethod
    def create(cls, ctx: BaseContext, slots: int = SLOTS) -> FailureTable:
        return cls(ctx.RawArray("q", slots), ctx.RawArray("q", slots), ctx.RawArray("d", slots),
                   ctx.RawArray("d", slots), ctx.Lock())


def _key(client: str) -> int:
    key = int.from_bytes(hashlib.blake2b(client.encode("utf-8", "replace"), digest_size=8)
                         .digest(), "little", signed=True)
    return key or 1  # 0 marks an empty slot


@dataclass
class SharedFailureThrottle(FailureThrottle):
    """``FailureThrottle`` whose counts are in a ``FailureTable`` (same rule, shared counts)."""

    table: FailureTable | None = field(default=None, kw_only=True)

    def _slot(self, client: str) -> tuple[FailureTable, int, int]:
        assert self.table is not None
        key = _key(client)
        return self.table, key, key % len(self.table.keys)

    def _locked(self) -> AbstractContextManager[object]:
        assert self.table is not None
        return self.table.lock  # type: ignore[no-any-return]

    def _get(self, client: str) -> tuple[int, float, float] | None:
        table, key, slot = self._slot(client)
        if table.keys[slot] != key:
            return None
        return int(table.counts[slot]), float(table.lasts[slot]), float(table.turns[slot])

    def _put(self, client: str, count: int, last: float, turn: float) -> None:
        table, key, slot = self._slot(client)
        table.keys[slot], table.counts[slot], table.lasts[slot] = key, count, last
        table.turns[slot] = turn

    def _drop(self, client: str) -> None:
        table, key, slot = self._slot(client)
        if table.keys[slot] == key:
            table.keys[slot], table.counts[slot], table.lasts[slot] = 0, 0, 0.0
            table.turns[slot] = 0.0
