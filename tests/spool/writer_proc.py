"""A spool writer for the multi-process tests: three threads and five asyncio tasks append, and
each spool id is printed once its accept returned (the moment a 250 would go out). It stops
appending after LIMIT records, if given, and waits (holding its open segment) until killed.
Run: python -m tests.spool.writer_proc ROOT KEY [LIMIT]."""

from __future__ import annotations

import asyncio
import itertools
import sys
import threading
import time
from pathlib import Path

from mailhub.spool.spool import Spool
from tests.spool.support import body, envelope, sealer


async def main(root: Path, key: bytes, limit: int) -> None:
    spool = Spool(root, sealer(key), segment_limit=200_000)  # rotates while it runs
    out = threading.Lock()
    numbers = itertools.count()

    def acked(sid: str) -> None:
        with out:
            sys.stdout.write(sid + "\n")
            sys.stdout.flush()

    def thread_writer() -> None:
        while (n := next(numbers)) < limit:
            acked(spool.accept(envelope(n=n), body(n)))

    async def task_writer() -> None:
        while (n := next(numbers)) < limit:
            acked(await spool.accept_async(envelope(n=n), body(n)))

    for _ in range(3):
        threading.Thread(target=thread_writer, daemon=True).start()
    await asyncio.gather(*(task_writer() for _ in range(5)))
    while True:  # stays alive with its segment open, like an idle submission child
        time.sleep(1)


if __name__ == "__main__":
    limit = int(sys.argv[3]) if len(sys.argv) > 3 else sys.maxsize
    asyncio.run(main(Path(sys.argv[1]), bytes.fromhex(sys.argv[2]), limit))
