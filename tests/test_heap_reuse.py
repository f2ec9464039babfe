"""glibc keeps freed buffers of a few hundred KiB for reuse once the heap is tuned."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 200


def churn_faults(rounds: int = ROUNDS) -> int:
    """Page faults while buffers of about 300 KB (a 200 KiB message's size) come and go."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(rounds):
        data = b"\x01" * (300_000 + (i % 7) * 1000)
        copy = data + b"x"
        del data, copy
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _fresh(code: str) -> int:
    """Run ``code`` in a new interpreter (this process's heap has a history) and read a count."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


def test_tuned_heap_reuses_freed_buffers() -> None:
    churn = "from tests.test_heap_reuse import churn_faults; print(churn_faults())"
    untuned = _fresh(churn)
    tuned = _fresh("from mailhub.heap_reuse import keep_freed_memory\n"
                   "assert keep_freed_memory()\n" + churn)
    assert untuned > 20 * ROUNDS  # each buffer faulted in afresh (about 75 pages)
    assert tuned < ROUNDS  # the same memory, reused
