"""Case store benchmark: file 100,000 inbound messages into 10,000 cases; then show a big case.

Not a test: run it by hand from the repository root,
``python bench/filing_bench.py [--messages N] [--cases N] [--db sqlite|postgresql|URL]``.

The instance is a real ``mailhub init`` in a temporary folder (``--db URL``: a throwaway
database created on that PostgreSQL server and dropped afterwards; ``--db postgresql``: a
private server started for the run, as the tests do, with fsync off). Every message goes
through the hub's own entry point, ``mailhub.cases.filing.file_inbound``, in its own session
and transaction, exactly as the inbound listener commits it. Crypto on the wire is not part of
this benchmark (messages arrive already opened, with their ``Protection``); sealing at rest is.

The mail flow (``bench/filing_mail.py``) is stationary: cases open evenly over the run, replies
go to recently opened cases, one case collects ``--big`` messages spread over the whole run,
so the first and the last 10% have the same mix and differ only in what is already stored.
Figures are printed as ratios to references measured in the same run, because absolute times
drift on shared machines: the last 10% against the first 10%, messages/second against the cost
of a bare one-row commit on the same database, and ``show_case`` of the big case against a bare
SELECT of its rows and against opening its sealed Subjects.

``--per-query`` times every SQL statement (first against last 10%) and EXPLAINs every SELECT
the run issued, flagging table scans; ``--profile`` runs cProfile over the first and the last
10%. Use them to find what grows when the last/first ratio is above its target (1.2).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.filing_mail import MailFlow, Planned  # noqa: E402


def admin(url: str, sql: str) -> None:
    """One statement outside a transaction (CREATE/DROP DATABASE) on the URL's server."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(sql))
    engine.dispose()


class Instance:
    """A real ``mailhub init`` instance in a temporary folder, on SQLite or PostgreSQL."""

    def __init__(self, db: str, name: str = "hub") -> None:
        if db not in ("sqlite", "postgresql") and not db.startswith("postgresql"):
            raise SystemExit(f"--db must be sqlite, postgresql or a postgresql URL, not {db!r}")
        self.root = Path(tempfile.mkdtemp(prefix="mhfb", dir="/tmp"))
        self.pg_server: Any = None
        self.pg_admin_url = self.pg_db = ""
        self.name = name
        try:
            self._make(db)
        except BaseException:
            self.close(keep=False)
            raise

    def _make(self, db: str) -> None:
        proc = subprocess.run([sys.executable, "-m", "mailhub", "init", str(self.root / self.name)],
                              capture_output=True, text=True, timeout=600, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"mailhub init failed: {proc.stderr}")
        self.config = self.root / self.name / "config.toml"
        self.label = "SQLite (WAL, synchronous=FULL)"
        if db == "postgresql":
            from tests.pgserver import PgServer

            self.pg_server = PgServer().start()
            self.pg_admin_url = self.pg_server.url("postgres")
            self.label = "PostgreSQL (a private server, fsync off)"
        elif db != "sqlite":
            self.pg_admin_url = db
            self.label = "PostgreSQL"
        if self.pg_admin_url:
            self.pg_db = f"mhbench_{secrets.token_hex(4)}"
            admin(self.pg_admin_url, f'CREATE DATABASE "{self.pg_db}"')
            url = f"{self.pg_admin_url.rsplit('/', 1)[0]}/{self.pg_db}"
            text = self.config.read_text(encoding="utf-8")
            self.config.write_text(text.replace('database_url = ""', f'database_url = "{url}"', 1),
                                   encoding="utf-8")
        from mailhub.app import Hub
        from mailhub.config import load_config

        self.hub = Hub(load_config(self.config))
        self.hub.migrate()  # a no-op on SQLite (init made it), the schema on the new PG database

    def close(self, keep: bool) -> None:
        if "hub" in vars(self):
            self.hub.engine.dispose()
        if self.pg_db and not keep:
            admin(self.pg_admin_url, f'DROP DATABASE IF EXISTS "{self.pg_db}" WITH (FORCE)')
        if self.pg_server is not None and not keep:
            self.pg_server.stop()
        if keep:
            print(f"kept the instance: {self.config}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)


def commit_floor(inst: Instance, count: int = 500) -> float:
    """Seconds per transaction that inserts one small row and commits (same database, same
    pragmas): the floor under any one-transaction-per-message filing."""
    from sqlalchemy import text

    engine = inst.hub.engine
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE bench_floor (id INTEGER PRIMARY KEY, v TEXT)"))
    times = []
    for i in range(count):
        start = time.perf_counter()
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO bench_floor (id, v) VALUES (:i, :v)"),
                         {"i": i, "v": "x" * 64})
        times.append(time.perf_counter() - start)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE bench_floor"))
    return statistics.mean(times)


class QueryTimer:
    """Time per SQL statement text (SQLAlchemy cursor events), split by phase of the run; keeps
    one parameter set of each SELECT so that ``explain`` can show how the database runs it."""

    def __init__(self, engine: Any) -> None:
        from sqlalchemy import event

        self.engine = engine
        self.phase = ""
        self.stats: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.samples: dict[str, tuple[str, Any]] = {}

        @event.listens_for(engine, "before_cursor_execute")
        def _before(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                    executemany: bool) -> None:
            conn.info["bench_t0"] = time.perf_counter()

        @event.listens_for(engine, "after_cursor_execute")
        def _after(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                   executemany: bool) -> None:
            took = time.perf_counter() - conn.info.pop("bench_t0", time.perf_counter())
            key = " ".join(statement.split())
            if self.phase:
                self.stats[key][self.phase].append(took)
            if key.startswith("SELECT") and not executemany and key not in self.samples:
                self.samples[key] = (statement, parameters)

    def report(self, first: str, last: str) -> None:
        """The statements that cost most in ``last``, each with its median against ``first``."""
        rows = []
        for stmt, by_phase in self.stats.items():
            a, b = by_phase.get(first, []), by_phase.get(last, [])
            if a and b:
                rows.append((sum(b), statistics.median(b) / statistics.median(a), len(b), stmt))
        print("  per-statement time in the last 10% (total; median against the first 10%):")
        for total, ratio, n, stmt in sorted(rows, reverse=True)[:15]:
            print(f"    {total:6.2f} s  {ratio:5.2f}x  {n:7d}x  {stmt[:120]}")

    def explain(self) -> None:
        """EXPLAIN each SELECT the run issued; flag table scans. PostgreSQL's statistics are
        refreshed first (autovacuum would have); SQLite's are left as the hub leaves them."""
        from sqlalchemy import text

        pg = self.engine.dialect.name == "postgresql"
        with self.engine.connect() as conn:
            if pg:
                conn.execute(text("ANALYZE"))
            flagged = 0
            for key, (statement, params) in sorted(self.samples.items()):
                prefix = "EXPLAIN " if pg else "EXPLAIN QUERY PLAN "
                plan = [str(r[0] if pg else r[-1])
                        for r in conn.exec_driver_sql(prefix + statement, params)]
                scans = [p.strip() for p in plan if ("Seq Scan" in p if pg else
                         p.startswith("SCAN ") and " USING " not in p)]
                if scans:
                    flagged += 1
                    print(f"    SCAN in: {key[:110]}\n      {'; '.join(scans)[:200]}")
            print(f"  EXPLAIN of {len(self.samples)} distinct SELECTs: {flagged} scan a table"
                  + (" (PostgreSQL scans tables of a few pages on purpose)" if pg else ""))


def file_one(hub: Any, planned: Planned, prof: cProfile.Profile | None = None
             ) -> tuple[Any, float, float, float]:
    """File one message as the inbound listener does (its own session and transaction);
    the result, and its wall, commit and process CPU seconds."""
    from sqlmodel import Session

    from mailhub.cases.filing import file_inbound

    c0, t0 = time.process_time(), time.perf_counter()
    if prof is not None:
        prof.enable()
    with Session(hub.engine, expire_on_commit=False) as session:
        result = file_inbound(session, hub, planned.raw, planned.protection,
                              envelope_from=planned.envelope_from,
                              recipients=planned.recipients, actor="inbound:bench")
        t1 = time.perf_counter()
        session.commit()
    if prof is not None:
        prof.disable()
    t2 = time.perf_counter()
    return result, t2 - t0, t2 - t1, time.process_time() - c0


def file_all(inst: Instance, flow: MailFlow, args: argparse.Namespace,
             timer: QueryTimer | None, twin: Instance | None,
             twin_flow: MailFlow | None) -> dict[str, Any]:
    """File every planned message; per-message seconds. With a twin (an empty instance), the
    first 10% of the same flow is filed into it interleaved with the last 10%: the empty-store
    cost measured at the same moment, whatever the machine does meanwhile."""
    n = args.messages
    tenth = max(1, n // 10)
    times: dict[str, list[float]] = defaultdict(list)
    reasons: Counter[str] = Counter()
    mix: dict[str, Counter[str]] = {"first": Counter(), "last": Counter()}
    misfiled: Counter[str] = Counter()
    profiles = {"first": cProfile.Profile(), "last": cProfile.Profile()} if args.profile else {}
    twin_messages = twin_flow.messages(tenth) if twin_flow is not None else iter(())
    started = time.perf_counter()
    for i, planned in enumerate(flow.messages(n)):
        phase = "first" if i < tenth else "last" if i >= n - tenth else ""
        if timer is not None:
            timer.phase = phase
        result, wall, commit, cpu = file_one(inst.hub, planned, profiles.get(phase))
        times["wall"].append(wall)
        times["commit"].append(commit)
        times["cpu"].append(cpu)
        reasons[result.reason] += 1
        if phase:
            mix[phase][result.reason] += 1
        check(flow, planned, result, misfiled)
        if phase == "last" and twin is not None and twin_flow is not None:
            other = next(twin_messages)
            result, wall, _, cpu = file_one(twin.hub, other)
            times["twin wall"].append(wall)
            times["twin cpu"].append(cpu)
            check(twin_flow, other, result, misfiled)
        if args.progress and (i + 1) % args.progress == 0:
            done = time.perf_counter() - started
            recent = statistics.mean(times["wall"][-args.progress:]) * 1000
            print(f"  {i + 1:>8,} filed, {done:7.1f} s, last {args.progress:,}: "
                  f"{recent:.2f} ms/message", flush=True)
    if timer is not None:
        timer.phase = ""
    for name, prof in profiles.items():
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(25)
        print(f"  cProfile, {name} 10%:\n{out.getvalue()}")
    return {"times": times, "reasons": reasons, "misfiled": misfiled, "mix": mix,
            "wall": time.perf_counter() - started}


def check(flow: MailFlow, planned: Planned, result: Any, misfiled: Counter[str]) -> None:
    """Record the case a first contact opened; count messages filed where they do not belong."""
    if planned.kind == "open":
        if not result.created_case:
            misfiled["first contact did not open a case"] += 1
        flow.case_ids[planned.case] = result.case_id
        return
    if planned.kind.startswith("dup") and not result.duplicate:
        misfiled["duplicate stored twice"] += 1
    if result.case_id != flow.case_ids.get(planned.case):
        misfiled[f"{planned.kind} filed in another case"] += 1


def show_big_case(inst: Instance, case_id: str, repeat: int = 5) -> dict[str, float]:
    """``show_case`` of the big case against a bare SELECT of its rows and opening its Subjects
    (the median of ``repeat`` runs each, all on a warm cache)."""
    from sqlalchemy import select
    from sqlmodel import Session

    from mailhub.cases.export import show_case
    from mailhub.cases.store import subject_aad
    from mailhub.store.models import StoredMessage

    hub = inst.hub
    sealer = hub.sealer
    table = StoredMessage.__table__  # type: ignore[attr-defined]
    cols = [c for c in table.columns if c.name != "body_sealed"]
    stmt = select(*cols).where(StoredMessage.case_id == case_id)  # type: ignore[arg-type]
    out: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeat + 1):  # the first round warms caches and is dropped
        with Session(hub.engine) as session:
            t0 = time.perf_counter()
            rows = session.execute(stmt).all()
            t1 = time.perf_counter()
            for r in rows:
                sealer.open(r.subject_sealed, aad=subject_aad(r.digest))
            t2 = time.perf_counter()
        with Session(hub.engine) as session:
            t3 = time.perf_counter()
            view = show_case(session, sealer, case_id)
            t4 = time.perf_counter()
        out["select"].append(t1 - t0)
        out["subjects"].append(t2 - t1)
        out["show"].append(t4 - t3)
        out["rows"].append(len(rows))
        out["shown"].append(len(view["messages"]))
    return {k: statistics.median(v[1:]) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--big", type=int, default=1_000, help="messages of the case shown at the end")
    ap.add_argument("--db", default="sqlite",
                    help="sqlite (default), postgresql (a private throwaway server), or the URL "
                         "of a PostgreSQL server (a database is created there and dropped)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--progress", type=int, default=10_000, help="print every N messages")
    ap.add_argument("--per-query", action="store_true",
                    help="time every SQL statement, first vs last 10%% (adds a little overhead)")
    ap.add_argument("--profile", action="store_true", help="cProfile the first and last 10%%")
    ap.add_argument("--keep", action="store_true", help="keep the instance and its database")
    ap.add_argument("--no-twin", action="store_true",
                    help="do not file the first 10%% again into an empty instance, interleaved "
                         "with the last 10%% (saves a tenth of the run)")
    args = ap.parse_args()
    if args.messages < args.cases + args.big or args.cases < 2:
        raise SystemExit("--messages must be at least --cases + --big, and --cases at least 2")

    t_init = time.perf_counter()
    inst = Instance(args.db)
    print(f"filing benchmark: {args.messages:,} messages into {args.cases:,} cases, "
          f"{inst.label}; instance made by 'mailhub init' in {time.perf_counter() - t_init:.1f} s")
    twin: Instance | None = None
    try:
        if not args.no_twin:  # on the same PostgreSQL server when there is one
            twin = Instance(inst.pg_admin_url or "sqlite", name="twin")
        floor = commit_floor(inst)
        flow = MailFlow(args.messages, args.cases, args.big, args.seed, inst.hub.domain)
        twin_flow = None if twin is None else MailFlow(args.messages, args.cases, args.big,
                                                        args.seed, twin.hub.domain)
        timer = QueryTimer(inst.hub.engine) if args.per_query else None
        res = file_all(inst, flow, args, timer, twin, twin_flow)
        shown = show_big_case(inst, flow.case_ids[0])
        report(res, floor, shown, flow)
        if timer is not None:
            timer.report("first", "last")
            timer.explain()
    finally:
        if twin is not None:
            twin.close(keep=False)
        inst.close(args.keep)


def report(res: dict[str, Any], floor: float, shown: dict[str, float], flow: MailFlow) -> None:
    t = res["times"]
    costs = t["wall"]
    tenth = max(1, len(costs) // 10)
    first, last = costs[:tenth], costs[-tenth:]
    total = sum(costs)

    def ms(values: list[float], q: float | None = None) -> float:
        if q is None:
            return statistics.mean(values) * 1000
        return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000

    def ratio(a: list[float], b: list[float]) -> float:
        return statistics.mean(a) / statistics.mean(b)

    print(f"  filed {len(costs):,} messages in {total:.1f} s of filing "
          f"({res['wall']:.1f} s wall, with generating the mail and the twin)")
    print(f"  threading: {dict(res['reasons'].most_common())}")
    print(f"  misfiled: {dict(res['misfiled']) or 'none'}")
    for name in ("first", "last"):
        print(f"  mix of the {name} 10%: {dict(sorted(res['mix'][name].items()))}")
    for name, part in (("first 10%", first), ("last 10% ", last)):
        print(f"  {name}: mean {ms(part):.3f} ms, p50 {ms(part, .5):.3f} ms, "
              f"p90 {ms(part, .9):.3f} ms, p99 {ms(part, .99):.3f} ms")
    for what, key in (("commit", "commit"), ("process CPU", "cpu")):
        a, b = t[key][:tenth], t[key][-tenth:]
        print(f"    of which {what}: first {ms(a):.3f} ms, last {ms(b):.3f} ms "
              f"(ratio {ratio(b, a):.3f})")
    r = ratio(last, first)
    print(f"    ratio last/first 10% (mean): {r:.3f}  (target <= 1.2: "
          f"{'met' if r <= 1.2 else 'NOT met'}); p50: "
          f"{statistics.median(last) / statistics.median(first):.3f}")
    if t["twin wall"]:
        print(f"  twin: the first 10% filed into an empty instance, interleaved with the last "
              f"10%: mean {ms(t['twin wall']):.3f} ms, CPU {ms(t['twin cpu']):.3f} ms")
        print(f"    ratio last 10% / twin (same moment, no machine drift): "
              f"{ratio(last, t['twin wall']):.3f}; CPU "
              f"{ratio(t['cpu'][-tenth:], t['twin cpu']):.3f}")
    print(f"  overall: {len(costs) / total:.0f} messages/s; reference, a bare one-row commit: "
          f"{floor * 1000:.3f} ms ({1 / floor:.0f}/s); ratio per-message cost / bare commit: "
          f"{total / len(costs) / floor:.2f}")
    print(f"  show_case of {flow.case_ids[0]} ({shown['shown']:.0f} messages): "
          f"{shown['show'] * 1000:.1f} ms; reference, bare SELECT of its {shown['rows']:.0f} rows: "
          f"{shown['select'] * 1000:.1f} ms; opening their {shown['rows']:.0f} sealed Subjects: "
          f"{shown['subjects'] * 1000:.1f} ms")
    print(f"    ratio show / bare SELECT: {shown['show'] / shown['select']:.1f}; "
          f"show / (SELECT + open Subjects): "
          f"{shown['show'] / (shown['select'] + shown['subjects']):.2f}")


if __name__ == "__main__":
    main()
