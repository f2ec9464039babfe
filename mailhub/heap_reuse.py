"""Keep freed heap memory for reuse in a process that handles large buffers one after another.

A crypto worker allocates and frees buffers of a few hundred KiB for every message (the job,
the message, gpg's output, the MIME it writes, the result frame). glibc serves allocations
above its mmap threshold with fresh mappings, and trims the heap's top once twice that
threshold is free, so nearly every such buffer was faulted in page by page and handed back to
the kernel when freed: 300 page faults for one 200 KiB S/MIME message. With the threshold at
4 MiB and up to 32 MiB of free heap kept, the same memory is reused (no page faults): the
worker's CPU for that message fell from 2.2 to 1.5 ms, for the PGP/MIME writing around gpg
from 0.42 to 0.10 ms.

Applied where it was measured to help: the crypto workers, and the serving hub's main process
(page faults for a 200 KiB OpenPGP message 50-61 -> 30-38, its CPU 0.1-0.2 ms less). The
submission listeners do not need it (no page faults there). gpg is not affected: the settings
are this process's, not the environment's.

The main process also keeps every thread on one malloc arena (``one_arena``). glibc gives each
new thread an arena of its own (up to eight per core), and a buffer is freed into the arena of
the thread that allocated it: the spool record one I/O thread reads, the result frame a
crypto-driver thread receives and the payload the commit thread binds each grew a pool of
their own, faulted in page by page (most faults in ``memset`` and ``memmove`` of fresh
pages). On one arena the same blocks serve every thread: over a new hub's first 400 200 KiB
OpenPGP messages 42-49 page faults a message instead of 65-86, resident memory 165-178 MB and
steady instead of 220-261 MB and growing. The main process's CPU moved less than the noise
once the heap had grown (mean of five interleaved pairs 2.31 -> 2.12 ms a message). The
threads barely contend for the arena: Python's own objects come from its allocator under the
GIL.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("mailhub.crypto")

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
# above the 1 MiB reads of gpg's output (gpg_process): larger blocks are still mapped alone
MMAP_THRESHOLD = 4 << 20
TRIM_THRESHOLD = 32 << 20  # at most this much freed memory stays with the process


def keep_freed_memory(one_arena: bool = False) -> bool:
    """Tune glibc's allocator for this process; False where there is no glibc ``mallopt``.

    ``one_arena``: every thread allocates from the main arena. Call it before the process
    starts threads: a thread that has already allocated keeps the arena it was given."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): leave the allocator alone
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if one_arena:
        done = bool(mallopt(M_ARENA_MAX, 1)) and done
    if not done:
        log.debug("mallopt refused the heap settings; the allocator keeps its defaults")
    return done
