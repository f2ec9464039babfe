"""Runs OpenPGP and S/MIME work in worker processes, off the event loop and past the GIL.

gpg is a process of its own, but building MIME and S/MIME in Python holds the GIL, so the
listeners would stall if it ran in threads. Jobs are plain, picklable data; the worker parses the
message, protects it and returns the bytes to send.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from mailhub.crypto.worker_pool import WorkerPool
from mailhub.errors import CryptoError


@dataclass(frozen=True)
class ProtectJob:
    method: str  # "openpgp" | "smime"
    gnupghome: str = ""
    signer_fpr: str = ""
    recipient_fprs: tuple[str, ...] = ()
    signer_key_pem: bytes = field(default=b"", repr=False)  # the hub's private key
    signer_cert_pem: bytes = b""
    recipient_cert_pems: tuple[bytes, ...] = ()
    autocrypt_header: str = ""


def parse(raw: bytes) -> EmailMessage:
    return message_from_bytes(raw, policy=policy.SMTP)  # type: ignore[return-value]


def protect_bytes(raw: bytes, job: ProtectJob) -> bytes:
    """Sign and encrypt one message (runs in a worker process); the body is never re-parsed."""
    if job.method == "openpgp":
        from mailhub.crypto.pgpmime import encrypt_bytes

        return encrypt_bytes(raw, gnupghome=job.gnupghome, recipients=list(job.recipient_fprs),
                             signer=job.signer_fpr, autocrypt_header=job.autocrypt_header or None)
    if job.method == "smime":
        from mailhub.crypto.smime import sign_encrypt_bytes

        return sign_encrypt_bytes(raw, job.signer_key_pem, job.signer_cert_pem,
                                  list(job.recipient_cert_pems))
    raise CryptoError(f"unknown protection method {job.method!r}")


Outcome = bytes | BaseException
CHUNK_BYTES = 1 << 20  # messages in one worker call, at most about this many bytes


def protect_chunk(items: list[tuple[bytes, ProtectJob]]) -> list[tuple[str, bytes | str]]:
    """Protect several messages in one worker call (one pipe round trip for all of them).

    Each outcome is ("ok", wire bytes), ("error", a MailhubError's text: safe to show) or
    ("internal", a description for the log): exceptions themselves may not survive pickling."""
    from mailhub.errors import MailhubError

    out: list[tuple[str, bytes | str]] = []
    for raw, job in items:
        try:
            out.append(("ok", protect_bytes(raw, job)))
        except MailhubError as exc:
            out.append(("error", str(exc)))
        except Exception as exc:  # noqa: BLE001 - reported to the caller, never lost
            out.append(("internal", repr(exc)))
    return out


def chunk_count(sizes: list[int], workers: int, limit: int = CHUNK_BYTES) -> int:
    """How many worker calls a batch of messages of ``sizes`` bytes is split into: one per
    worker at least, and about ``limit`` bytes of messages in each at most (32 messages of
    200 KiB in two calls made result frames of 4 MB: fresh memory for every batch)."""
    return max(1, min(len(sizes), max(workers, -(-sum(sizes) // limit))))


def _outcome(kind: str, value: bytes | str) -> Outcome:
    if kind == "ok":
        assert isinstance(value, bytes)
        return value
    if kind == "error":
        return CryptoError(str(value))
    return RuntimeError(str(value))


class CryptoEngine:
    """A process pool for protect jobs; ``workers=0`` runs inline (tests, one-shot commands)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool = WorkerPool(workers) if workers > 0 else None

    async def _run(self, fn: Any, *args: Any) -> Any:
        if self._pool is None:
            return await asyncio.to_thread(fn, *args)
        return await asyncio.wrap_future(self._pool.submit(fn, *args))

    async def protect(self, raw: bytes, job: ProtectJob) -> bytes:
        return await self._run(protect_bytes, raw, job)  # type: ignore[no-any-return]

    async def protect_many(self, items: list[tuple[bytes, ProtectJob]]) -> list[Outcome]:
        """Protect a batch: split into one chunk per worker (more for large messages), so a
        batch costs a pipe round trip per chunk instead of one per message. Outcomes in input
        order."""
        if not items:
            return []
        n = chunk_count([len(raw) for raw, _ in items], self.workers)
        chunks = [items[i::n] for i in range(n)]  # round robin: similar sizes side by side
        if self._pool is None:
            done = [await asyncio.to_thread(protect_chunk, c) for c in chunks]
        else:
            done = await asyncio.gather(*(self._run(protect_chunk, c) for c in chunks))
        out: list[Outcome] = [b""] * len(items)
        for i, chunk_out in enumerate(done):
            for j, (kind, value) in enumerate(chunk_out):
                out[i + j * n] = _outcome(kind, value)
        return out

    async def call(self, fn: Any, *args: Any) -> Any:
        """Run any picklable crypto function (e.g. opening inbound mail) in the pool."""
        return await self._run(fn, *args)

    def protect_sync(self, raw: bytes, job: ProtectJob) -> bytes:
        if self._pool is None:
            return protect_bytes(raw, job)
        return self._pool.submit(protect_bytes, raw, job).result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
