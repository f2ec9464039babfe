"""``schedule list|run-due|recompute`` and ``templates preview|list``."""

from __future__ import annotations

import argparse
from typing import Any

from sqlmodel import Session, select

from mailhub.cli.output import add_json, hub_from, print_json, print_table
from mailhub.errors import MailhubError, NotFound
from mailhub.scheduler.timecalc import local_iso
from mailhub.store.models import ScheduleEntry


def entry_json(row: ScheduleEntry) -> dict[str, Any]:
    """One ledger row as ``schedule list --json`` (and ``cases show``) print it."""
    return {"case": row.case_id, "step": row.step, "template": row.template,
            "send_at_utc": row.send_at_utc.isoformat(),
            "send_at_local": local_iso(row.send_at_utc, row.timezone),
            "timezone": row.timezone, "status": row.status, "reason": row.reason,
            "valid_until_utc": row.valid_until_utc.isoformat() if row.valid_until_utc else None,
            "plan": row.plan, "plan_version": row.plan_version,
            "template_version": row.template_version,
            "queue_source_id": row.queue_source_id or None,
            "sent_at": row.sent_at.isoformat() if row.sent_at else None}


def schedule_list(session: Session, case_id: str | None = None) -> list[dict[str, Any]]:
    """Ledger rows in send order, as JSON-ready dicts."""
    stmt = select(ScheduleEntry)
    if case_id is not None:
        stmt = stmt.where(ScheduleEntry.case_id == case_id)
    stmt = stmt.order_by(ScheduleEntry.send_at_utc, ScheduleEntry.case_id,  # type: ignore[arg-type]
                         ScheduleEntry.id)
    return [entry_json(r) for r in session.scalars(stmt)]


def register(sub: Any) -> None:
    s = sub.add_parser("schedule", help="scheduled care-plan messages")
    ss = s.add_subparsers(dest="schedule_cmd", required=True, metavar="ACTION")
    p = ss.add_parser("list", help="scheduled messages with UTC and patient-local send times")
    p.add_argument("--case", metavar="ID", help="only this case")
    add_json(p)
    p.set_defaults(func=cmd_list)
    p = ss.add_parser("run-due", help="send what is due now (for cron-style deployments)")
    add_json(p)
    p.set_defaults(func=cmd_run_due)
    p = ss.add_parser("recompute", help="recompute pending steps from the care plans "
                                        "(after editing a plan)")
    p.add_argument("--case", metavar="ID", help="only this case (default: every open case)")
    add_json(p)
    p.set_defaults(func=cmd_recompute)

    t = sub.add_parser("templates", help="care-plan message templates")
    ts = t.add_subparsers(dest="templates_cmd", required=True, metavar="ACTION")
    p = ts.add_parser("preview", help="render one step of a case to the terminal")
    p.add_argument("case", metavar="CASE")
    p.add_argument("step", metavar="STEP", help="a step id of the case's care plan")
    p.add_argument("--language", help="render in this language instead of the patient's")
    p.set_defaults(func=cmd_preview)
    p = ts.add_parser("list", help="templates and the languages each exists in")
    add_json(p)
    p.set_defaults(func=cmd_templates_list)


def cmd_list(args: argparse.Namespace) -> int:
    from mailhub.store.models import Case

    hub = hub_from(args)
    with Session(hub.engine) as session:
        if args.case and session.get(Case, args.case) is None:
            raise NotFound(f"no case {args.case}", hint="see 'mailhub cases list'")
        rows = schedule_list(session, args.case)
    if args.json:
        print_json(rows)
    else:
        print_table(rows, ["case", "step", "status", "send_at_local", "timezone", "send_at_utc",
                           "template"], "nothing is scheduled")
    return 0


def cmd_run_due(args: argparse.Namespace) -> int:
    from mailhub.scheduler.dispatcher import Dispatcher

    hub = hub_from(args)
    report = Dispatcher(hub).run_due()
    if args.json:
        print_json(report.as_json())
    else:
        print(f"{report.claimed} due: {report.sent} sent, {report.held} held, {report.missed} "
              f"missed, {report.skipped} skipped, {report.pending} waiting, "
              f"{report.errors} errors")
        for o in report.outcomes:
            print(f"  {o.case_id} {o.step}: {o.status}" + (f" ({o.reason})" if o.reason else ""))
    return 1 if report.errors else 0


def cmd_recompute(args: argparse.Namespace) -> int:
    """Recompute one case, or every open one. With every case, one that cannot be scheduled (a
    missing care plan, a bad zone) is reported and the others are still recomputed, each in a
    savepoint of its own; the exit status is 1 if any failed."""
    from mailhub.scheduler.ledger import TERMINAL_CASE_STATUSES, reschedule_case
    from mailhub.store.models import Case

    hub = hub_from(args)
    results: list[dict[str, Any]] = []
    failed = 0
    with Session(hub.engine) as session:
        if args.case:
            ids = [args.case]
        else:
            ids = list(session.scalars(select(Case.id).where(
                Case.status.not_in(TERMINAL_CASE_STATUSES))))  # type: ignore[attr-defined]
        for case_id in ids:
            if args.case:  # the one case asked for: its error is the command's error
                r = reschedule_case(session, hub, case_id, actor="cli")
            else:
                try:
                    with session.begin_nested():
                        r = reschedule_case(session, hub, case_id, actor="cli")
                except MailhubError as exc:
                    failed += 1
                    results.append({"case": case_id, "error": exc.message, "hint": exc.hint or ""})
                    continue
            results.append({"case": r.case_id, "plan": r.plan, "inserted": list(r.inserted),
                            "updated": list(r.updated), "deleted": list(r.deleted),
                            "cancelled": list(r.cancelled)})
        session.commit()
    if args.json:
        print_json(results)
    else:
        for r in results:
            if "error" in r:
                print(f"{r['case']}: not recomputed: {r['error']}"
                      + (f" (hint: {r['hint']})" if r["hint"] else ""))
                continue
            print(f"{r['case']}: {len(r['inserted'])} new, {len(r['updated'])} moved, "
                  f"{len(r['deleted'])} removed, {len(r['cancelled'])} cancelled")
    return 1 if failed else 0


def _preview_context(session: Session, hub: Any, case_id: str, step_id: str
                     ) -> tuple[str, str | None, dict[str, Any]]:
    """(template, patient language, context) for one step of a case, as it would be sent."""
    from mailhub.scheduler.ledger import care_plans, case_times, plan_for
    from mailhub.scheduler.sender import coordinator_address, render_context
    from mailhub.scheduler.steps import PlannedStep, place_step
    from mailhub.store.models import Case, Patient, ScheduleEntry, utcnow

    case = session.get(Case, case_id)
    if case is None:
        raise NotFound(f"no case {case_id}", hint="see 'mailhub cases list'")
    patient = session.get(Patient, case.patient_id) if case.patient_id else None
    if patient is None:
        raise MailhubError(f"case {case_id} has no patient")
    plan = plan_for(case, care_plans(hub))
    if plan is None:
        raise MailhubError(f"case {case_id} has no care plan",
                           hint="set one with 'mailhub cases set ID procedure=<plan>'")
    try:
        step = plan.step(step_id)
    except KeyError:
        raise NotFound(f"care plan {plan.name!r} has no step {step_id!r}",
                       hint=f"its steps: {', '.join(s.id for s in plan.steps)}") from None
    row = session.scalars(select(ScheduleEntry).where(ScheduleEntry.case_id == case_id,
                                                   ScheduleEntry.step == step_id)).first()
    if row is not None:
        send_at, tz = row.send_at_utc, row.timezone
    else:
        placed = place_step(step, case_times(case, patient), hub.config.scheduler.quiet_hours)
        send_at, tz = ((placed.send_at_utc, placed.timezone) if isinstance(placed, PlannedStep)
                       else (utcnow(), patient.timezone or "UTC"))
    name = coordinator_address(session, case)[0]
    return step.template, patient.language, render_context(case, patient, name, send_at, tz)


def cmd_preview(args: argparse.Namespace) -> int:
    from mailhub.outbound.render import TemplateRenderer, preview

    hub = hub_from(args)
    with Session(hub.engine) as session:
        template, language, ctx = _preview_context(session, hub, args.case, args.step)
    renderer = TemplateRenderer(hub.config.hub.templates_dir)
    print(preview(renderer, template, args.language or language, ctx), end="")
    return 0


def cmd_templates_list(args: argparse.Namespace) -> int:
    from mailhub.outbound.render import TemplateRenderer

    hub = hub_from(args, migrate=False)
    found = TemplateRenderer(hub.config.hub.templates_dir).templates()
    rows = [{"template": name, "languages": langs} for name, langs in sorted(found.items())]
    if args.json:
        print_json(rows)
    else:
        print_table([{"template": r["template"], "languages": ", ".join(r["languages"])}
                     for r in rows], ["template", "languages"], "no templates")
    return 0
