"""Scheduler benchmark: 100,000 pending steps; start-up time, peak memory, lateness of due steps.

Not a test: run it by hand, ``python bench/scheduler_bench.py [--pending N] [--due N]
[--database-url URL]``. Every figure is printed next to a reference measured in the same run,
as a ratio, because absolute times drift on shared machines:

- start-up: the serving dispatcher (apscheduler armed, everything due handled) with N pending
  steps, against (a) a bare ``SELECT`` of the same N rows and (b) the same start-up on an empty
  ledger;
- peak memory (``ru_maxrss``) of the process doing each of those;
- lateness (hand-over time minus due time) of steps coming due a few seconds after start-up,
  with N pending steps, against the same steps on an empty ledger.

Each phase runs in a fresh process, so peaks do not leak from one into the next.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STEPS_PER_CASE = 8


def make_hub(root: Path, database_url: str = ""):  # type: ignore[no-untyped-def]
    from mailhub.app import Hub
    from mailhub.config import load_config
    from mailhub.crypto.atrest import generate_atrest_key

    cfg = root / "config.toml"
    if not cfg.exists():
        (root / "keys").mkdir(parents=True, mode=0o700)
        generate_atrest_key(root / "keys" / "atrest.key")
        cfg.write_text(f'[hub]\ndomain = "medvoyage.example"\ndata_dir = "var"\n'
                       f'database_url = "{database_url}"\nrules_dir = "{REPO / "rules"}"\n'
                       f'templates_dir = "{REPO / "templates"}"\n'
                       '[delivery]\nsmarthost = "127.0.0.1:9"\n')
    hub = Hub(load_config(cfg))
    hub.migrate()
    return hub


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def populate(root: Path, pending: int, database_url: str) -> dict[str, Any]:
    """N pending steps over the next 90 days (cases of 8 steps each), bulk-inserted."""
    from sqlalchemy import insert

    from mailhub.store.models import Case, Patient, ScheduleEntry

    hub = make_hub(root, database_url)
    now = datetime.now(UTC)
    cases = (pending + STEPS_PER_CASE - 1) // STEPS_PER_CASE
    started = time.perf_counter()
    with hub.engine.begin() as conn:
        conn.execute(insert(Patient), [
            {"id": i + 1, "name": f"Patient {i}", "email": f"p{i}@patient.example",
             "timezone": "America/Chicago", "language": "en"} for i in range(cases + 1)])
        conn.execute(insert(Case), [
            {"id": f"MT-B-{i:06d}", "patient_id": i + 1, "status": "pre-op",
             "procedure": "hip-replacement", "procedure_tz": "Europe/Istanbul",
             "procedure_at": now + timedelta(days=30), "created_at": now, "updated_at": now,
             "consent_plain_email": False} for i in range(cases + 1)])
        batch = []
        for n in range(pending):
            batch.append({"case_id": f"MT-B-{n // STEPS_PER_CASE:06d}",
                          "step": f"step-{n % STEPS_PER_CASE}", "template": "prep-guide",
                          "plan": "hip-replacement", "send_at_utc": now + timedelta(
                              hours=1, seconds=(n * 7919) % (90 * 86400)),
                          "timezone": "America/Chicago", "status": "pending",
                          "updated_at": now, "attempts": 0})
            if len(batch) == 10000:
                conn.execute(insert(ScheduleEntry), batch)
                batch = []
        if batch:
            conn.execute(insert(ScheduleEntry), batch)
    return {"cases": cases, "insert_s": time.perf_counter() - started}


def reference_select(root: Path, database_url: str) -> dict[str, Any]:
    """The floor: read every pending row once (plain SQL, tuples), as a job store loading
    all of them at start-up would have to at least."""
    from sqlalchemy import text

    hub = make_hub(root, database_url)
    with hub.engine.connect() as conn:  # connect and warm up outside the timing
        conn.execute(text("SELECT 1")).all()
        base = maxrss_mb()
        started = time.perf_counter()
        n = len(conn.execute(text("SELECT * FROM schedule WHERE status = 'pending'")).all())
        seconds = time.perf_counter() - started
    return {"rows": n, "seconds": seconds, "maxrss_mb": maxrss_mb(), "base_mb": base}


def dispatch(root: Path, due: int, database_url: str) -> dict[str, Any]:
    """Start the serving dispatcher; steps come due 2-4 s later; measure when each is handed over."""
    from sqlmodel import Session, select

    from mailhub.scheduler.dispatcher import Dispatcher
    from mailhub.store.models import Case, Patient, ScheduleEntry

    hub = make_hub(root, database_url)
    with Session(hub.engine) as session:  # the due steps' case (made here: fresh due times)
        session.add(Patient(id=10_000_000, name="Due Patient", email="due@patient.example",
                            timezone="America/Chicago", language="en"))
        session.flush()
        session.add(Case(id="MT-B-DUE", patient_id=10_000_000, status="pre-op",
                         procedure="hip-replacement", procedure_tz="Europe/Istanbul",
                         procedure_at=datetime.now(UTC) + timedelta(days=30)))
        session.commit()
    base = maxrss_mb()

    async def run() -> dict[str, Any]:
        stop = asyncio.Event()
        fired: list[float] = []
        dispatcher = Dispatcher(hub, "bench", poll_interval=0.5,
                                on_run=lambda report: fired.extend(report.fired))
        started = time.perf_counter()
        task = asyncio.create_task(dispatcher.run(stop))
        await dispatcher.ready.wait()  # caught up and armed
        startup = time.perf_counter() - started
        startup_rss = maxrss_mb()
        first = datetime.now(UTC) + timedelta(seconds=2)
        with Session(hub.engine) as session:  # another process would do this (cases set)
            for i in range(due):
                session.add(ScheduleEntry(case_id="MT-B-DUE", step=f"due-{i}",
                                          template="prep-guide", plan="hip-replacement",
                                          send_at_utc=first + timedelta(seconds=2 * i / due),
                                          timezone="America/Chicago"))
            session.commit()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            with Session(hub.engine) as session:
                left = session.exec(select(ScheduleEntry.id).where(
                    ScheduleEntry.case_id == "MT-B-DUE",
                    ScheduleEntry.status == "pending")).all()
            if not left:
                break
        stop.set()
        await task
        with Session(hub.engine) as session:
            done = session.exec(select(ScheduleEntry).where(
                ScheduleEntry.case_id == "MT-B-DUE")).all()
        late = sorted((r.sent_at - r.send_at_utc).total_seconds() for r in done if r.sent_at)
        return {"startup_s": startup, "startup_maxrss_mb": startup_rss, "base_mb": base,
                "lateness": late, "fired": sorted(fired), "handled": len(late),
                "maxrss_mb": maxrss_mb()}

    return asyncio.run(run())


def phase(name: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run one phase in a fresh interpreter and return its JSON result."""
    cmd = [sys.executable, __file__, "--phase", name, "--root", str(root), "--pending",
           str(args.pending), "--due", str(args.due), "--database-url", args.database_url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def admin(url: str, sql: str) -> None:
    """Run one statement outside a transaction (CREATE/DROP DATABASE) on the URL's server."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(sql))
    engine.dispose()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pending", type=int, default=100_000)
    ap.add_argument("--due", type=int, default=40)
    ap.add_argument("--database-url", default="",
                    help="PostgreSQL URL of an EMPTY database for the loaded run (default: SQLite)")
    ap.add_argument("--empty-database-url", default="",
                    help="with --database-url: a second empty database for the reference run "
                         "(default: created next to the first, and dropped)")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        root = Path(args.root)
        fn = {"populate": lambda: populate(root, args.pending, args.database_url),
              "select": lambda: reference_select(root, args.database_url),
              "dispatch": lambda: dispatch(root, args.due, args.database_url)}[args.phase]
        print(json.dumps(fn()))
        return

    empty_url, made = args.empty_database_url, ""
    if args.database_url and not empty_url:
        made = f"{args.database_url.rsplit('/', 1)[1]}_bench_empty"
        admin(args.database_url, f'CREATE DATABASE "{made}"')
        empty_url = f"{args.database_url.rsplit('/', 1)[0]}/{made}"
    try:
        with tempfile.TemporaryDirectory(prefix="mhbench") as tmp:
            loaded, empty = Path(tmp) / "loaded", Path(tmp) / "empty"
            fill = phase("populate", loaded, args)
            ref = phase("select", loaded, args)
            run_loaded = phase("dispatch", loaded, args)
            run_empty = phase("dispatch", empty,
                              argparse.Namespace(**{**vars(args), "database_url": empty_url}))
    finally:
        if made:
            admin(args.database_url, f'DROP DATABASE IF EXISTS "{made}" WITH (FORCE)')

    print(f"scheduler benchmark: {args.pending:,} pending steps "
          f"({'PostgreSQL' if args.database_url else 'SQLite'}), {args.due} steps coming due")
    print(f"  populate (bulk insert, not measured against anything): {fill['insert_s']:.1f} s")
    print(f"  reference: bare SELECT of {ref['rows']:,} rows: {ref['seconds']:.3f} s, "
          f"peak RSS {ref['maxrss_mb']:.0f} MB (process base {ref['base_mb']:.0f} MB)")
    print(f"  start-up with {args.pending:,} pending: {run_loaded['startup_s']:.3f} s; "
          f"empty ledger: {run_empty['startup_s']:.3f} s")
    print(f"    ratio start-up / bare SELECT: {run_loaded['startup_s'] / ref['seconds']:.3f}")
    print(f"    ratio start-up loaded / empty: "
          f"{run_loaded['startup_s'] / max(run_empty['startup_s'], 1e-9):.2f}")
    print(f"  peak RSS at start-up: loaded {run_loaded['startup_maxrss_mb']:.0f} MB, empty "
          f"{run_empty['startup_maxrss_mb']:.0f} MB, bare SELECT {ref['maxrss_mb']:.0f} MB "
          f"(ratio loaded/SELECT {run_loaded['startup_maxrss_mb'] / ref['maxrss_mb']:.2f}, "
          f"loaded/empty {run_loaded['startup_maxrss_mb'] / run_empty['startup_maxrss_mb']:.2f})")
    for label, res in (("loaded", run_loaded), ("empty", run_empty)):
        for what, late in (("fired (claimed)", res["fired"]),
                           ("handed over (queued/held)", res["lateness"])):
            print(f"  lateness {label}, {what}: {len(late)}/{args.due}; min {pct(late, 0):.3f} s, "
                  f"p50 {pct(late, .5):.3f} s, p90 {pct(late, .9):.3f} s, max {pct(late, 1):.3f} s")
    for what in ("fired", "lateness"):
        a, b = run_loaded[what], run_empty[what]
        if a and b:
            print(f"    ratio {what} loaded / empty: p50 "
                  f"{statistics.median(a) / max(statistics.median(b), 1e-9):.2f}, max "
                  f"{max(a) / max(max(b), 1e-9):.2f}")


if __name__ == "__main__":
    main()
