"""Two dispatchers racing on ONE real PostgreSQL database send every due step exactly once.

Each instance has its own spool folder (as on two machines); the only thing they share is the
database. "Exactly once" is checked where it matters, by counting hand-overs per ledger row
across both instances' reports, not only by the outbound queue's unique (source, recipient).
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

from sqlmodel import Session

from mailhub.scheduler.dispatcher import Dispatcher, RunReport
from mailhub.scheduler.ledger import reschedule_case
from tests.pgserver import pg_url  # noqa: F401
from tests.scheduler.sched_support import light_hub, make_case, outbound, rows, wall
from tests.scheduler.test_ledger import BEFORE, EVENTS, IST

CASES = 12


def test_two_instances_on_one_postgresql_send_each_step_once(short_tmp: Path,
                                                              pg_url: str) -> None:  # noqa: F811
    hub_a = light_hub(short_tmp / "a", database_url=pg_url)
    hub_b = light_hub(short_tmp / "b", database_url=pg_url)
    with Session(hub_a.engine) as session:
        for n in range(CASES):
            make_case(session, f"MT-2027-{n + 1:04d}", email=f"p{n}@patient.example",
                      events=EVENTS)
            reschedule_case(session, hub_a, f"MT-2027-{n + 1:04d}", now=BEFORE)
        session.commit()
    # every case: arrival-welcome due within its window, prep guide and travel checklist missed
    now = wall("2027-03-18T09:00", IST)
    reports: dict[str, list[RunReport]] = {"a": [], "b": []}
    barrier = threading.Barrier(2)

    def work(name: str, hub) -> None:  # type: ignore[no-untyped-def]
        dispatcher = Dispatcher(hub, f"instance-{name}", batch=2, concurrency=3)
        barrier.wait()
        for _ in range(3):
            reports[name].append(dispatcher.run_due(now))

    threads = [threading.Thread(target=work, args=("a", hub_a)),
               threading.Thread(target=work, args=("b", hub_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)

    outcomes = [o for rs in reports.values() for r in rs for o in r.outcomes]
    assert sum(r.errors for rs in reports.values() for r in rs) == 0
    handled = Counter(o.entry_id for o in outcomes if o.status in ("held", "sent", "missed"))
    all_rows = rows_by_id(hub_a)
    due = {i for i, r in all_rows.items() if r.step in ("arrival-welcome", "prep-guide",
                                                         "travel-checklist")}
    assert len(due) == 3 * CASES
    assert set(handled) == due and set(handled.values()) == {1}  # each exactly once
    # both instances took part (the race was real), and neither sent what the other did
    by_instance = {name: {o.entry_id for r in rs for o in r.outcomes} for name, rs in
                   reports.items()}
    assert by_instance["a"] and by_instance["b"]

    queue = outbound(hub_a)
    per_source = Counter(q.source_id for q in queue if q.kind == "mail")
    welcome_ids = {i for i, r in all_rows.items() if r.step == "arrival-welcome"}
    assert per_source == Counter({f"sched-{i}": 1 for i in welcome_ids})
    missed_notices = Counter(q.source_id for q in queue if q.source_id.endswith(":missed"))
    assert len(missed_notices) == 2 * CASES and set(missed_notices.values()) == {1}
    assert {r.status for r in all_rows.values() if r.id in welcome_ids} == {"held"}
    for hub in (hub_a, hub_b):
        assert hub.spool.pending("scheduler") == []
    hub_a.engine.dispose()
    hub_b.engine.dispose()


def rows_by_id(hub) -> dict[int, object]:  # type: ignore[no-untyped-def]
    out = {}
    for n in range(CASES):
        for r in rows(hub, f"MT-2027-{n + 1:04d}").values():
            out[r.id] = r
    return out
