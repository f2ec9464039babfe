"""The queue database's size over bursts of relayed mail: does it grow with every message sent?

Relays ``--bursts`` bursts of ``--messages`` messages (OpenPGP, ``--size`` bytes, 8 sessions)
through a real ``mailhub serve`` to the benchmark's sink, waits after each burst for the payload
sweep (which runs every minute), and prints the database's size and page counts, and the size
of the payload segment files beside it (large payloads since the tenth pass). Run it twice
to compare: with ``--keep 0`` (payloads of sent mail deleted at the next sweep) and with the
default one day (nothing is old enough to go during the run: the size a hub without the sweep
would reach). Run from the repository root: ``python -m bench.queue_growth``.
"""

from __future__ import annotations

import argparse
import sqlite3
import time
from pathlib import Path

from bench.common import Serve, cleanup, make_hub, short_tmp
from bench.loadgen import ServerProcess, free_port
from bench.relay_bench import SIZES, relay_case


def db_state(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        sent = conn.execute("SELECT count(*) FROM outbound WHERE status = 'sent'").fetchone()[0]
        payloads = conn.execute("SELECT count(*) FROM payloads").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    finally:
        conn.close()
    size = sum(p.stat().st_size for p in (db, db.with_name(db.name + "-wal")) if p.exists())
    segments = list(db.with_name("payloads").glob("*.pay"))
    seg_size = sum(p.stat().st_size for p in segments)
    return (f"{sent} sent rows, {payloads} payloads, database + WAL {size / 1e6:.1f} MB "
            f"({pages} pages, {free} free), payload files {seg_size / 1e6:.1f} MB "
            f"({len(segments)} segments)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", default="86400",
                    help="[delivery].keep_sent_payloads in seconds (default: a day)")
    ap.add_argument("--bursts", type=int, default=3)
    ap.add_argument("--messages", type=int, default=500, help="messages a burst")
    ap.add_argument("--size", default="200KiB", choices=sorted(SIZES))
    ap.add_argument("--wait", type=float, default=62,
                    help="seconds after each burst, for the sweep (it runs every minute)")
    args = ap.parse_args()
    root, sink_port = short_tmp(), free_port()
    hub = make_hub(root, sink_port, {"delivery.keep_sent_payloads": args.keep})
    sink = ServerProcess("sink", hub.tls_cert, hub.tls_key, port=sink_port).start()
    serve = Serve(hub).start()
    db = next((hub.root / "var").rglob("*.db"))
    print(f"keep_sent_payloads = {args.keep}; {args.bursts} bursts of {args.messages} "
          f"{args.size} OpenPGP messages")
    try:
        for burst in range(args.bursts):
            row = relay_case(hub, serve, sink, "openpgp", args.size, args.messages, 8,
                             f"burst{burst}")
            time.sleep(args.wait)
            print(f"  after {args.messages * (burst + 1)} messages ({row.rate:.0f} msg/s): "
                  f"{db_state(db)}", flush=True)
    finally:
        serve.kill()
        sink.stop()
        cleanup(root)


if __name__ == "__main__":
    main()
