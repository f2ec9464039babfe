"""``cases open|set|list|show|merge|export``: the case files from the command line."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import Any

from sqlalchemy.orm import Session

from mailhub.cli.output import add_json, hub_from, print_json, print_table
from mailhub.errors import MailhubError


def register(sub: Any) -> None:
    c = sub.add_parser("cases", help="case files: open, set, list, show, merge, export")
    cs = c.add_subparsers(dest="cases_cmd", required=True, metavar="ACTION")

    p = cs.add_parser("open", help="open a case; prints its id")
    p.add_argument("--patient-name", required=True)
    p.add_argument("--patient-email", required=True)
    p.add_argument("--timezone", required=True, help="the patient's home zone (IANA name)")
    p.add_argument("--language", default="en", help="the patient's language (default: en)")
    p.add_argument("--procedure", default="", help="the care plan's name")
    p.add_argument("--clinic", default="")
    p.add_argument("--coordinator", default="", help="the coordinator (e-mail address or name)")
    p.add_argument("--status", default="inquiry", help="initial status (default: inquiry)")
    add_json(p)
    p.set_defaults(func=cmd_open)

    p = cs.add_parser("set", help="set case fields and events (KEY=VALUE ...)",
                      description="keys: procedure_at, arrival_at, discharge_at, return_home_at "
                      "(local wall time like 2026-12-03T08:00, empty to clear), <event>_tz, "
                      "status, consent_plain_email=yes|no, clinic, coordinator, language, "
                      "timezone, procedure, patient_name, patient_email")
    p.add_argument("id")
    p.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    add_json(p)
    p.set_defaults(func=cmd_set)

    p = cs.add_parser("list", help="list cases")
    p.add_argument("--status")
    p.add_argument("--clinic")
    p.add_argument("--text", help="search id, patient, procedure, clinic, coordinator")
    add_json(p)
    p.set_defaults(func=cmd_list)

    p = cs.add_parser("show", help="a case with its messages and schedule")
    p.add_argument("id")
    add_json(p)
    p.set_defaults(func=cmd_show)

    p = cs.add_parser("merge", help="move SOURCE's messages and participants into INTO")
    p.add_argument("source")
    p.add_argument("into")
    add_json(p)
    p.set_defaults(func=cmd_merge)

    p = cs.add_parser("export", help="write the DECRYPTED case file (mbox or zip)")
    p.add_argument("id")
    p.add_argument("--output", "-o", required=True, help="new file to write (created 0600)")
    p.add_argument("--format", choices=["mbox", "zip"], default="mbox")
    add_json(p)
    p.set_defaults(func=cmd_export)


def actor() -> str:
    return f"cli:{os.environ.get('SUDO_USER') or getpass.getuser()}"


def _session(hub: Any) -> Session:
    return Session(hub.engine, expire_on_commit=False)


def _notes(notes: list[str]) -> None:
    for note in notes:
        print(f"mailhub: note: {note}", file=sys.stderr)


def cmd_open(args: argparse.Namespace) -> int:
    from mailhub.cases.service import open_case

    hub = hub_from(args)
    with _session(hub) as session:
        case = open_case(session, patient_name=args.patient_name,
                         patient_email=args.patient_email, timezone=args.timezone,
                         language=args.language, procedure=args.procedure, clinic=args.clinic,
                         coordinator=args.coordinator, status=args.status, actor=actor())
        session.commit()
    _notes(_plan_notes(hub, args.procedure) + _language_notes(hub, args.language))
    if args.json:
        print_json({"id": case.id})
    else:
        print(case.id)
    return 0


def _plan_notes(hub: Any, procedure: str) -> list[str]:
    """A note when the procedure names no care plan (the case opens anyway)."""
    if not procedure:
        return []
    from mailhub.scheduler.plans import load_care_plans

    try:
        plans = load_care_plans(hub.config.hub.rules_dir, hub.config.hub.templates_dir)
    except MailhubError as exc:
        return [f"care plans could not be read: {exc}"]
    if procedure in plans:
        return []
    known = ", ".join(sorted(plans)) or "none"
    return [f"no care plan named {procedure!r} (known: {known}); nothing will be scheduled"]


def _language_notes(hub: Any, language: str) -> list[str]:
    """A note when no template speaks the patient's language: they will get English (the case
    is opened or changed anyway, as ``templates preview`` shows the same fallback)."""
    from mailhub.outbound.render import FALLBACK_LANGUAGE, TemplateRenderer

    wanted = (language or "").strip().lower()
    if not wanted:
        return []
    spoken = {lang for langs in TemplateRenderer(hub.config.hub.templates_dir).templates().values()
              for lang in langs}
    if wanted in spoken or wanted.split("-")[0] in spoken or not spoken:
        return []
    return [f"no templates in language {language!r} (there are: {', '.join(sorted(spoken))}); "
            f"this patient's scheduled messages will be in {FALLBACK_LANGUAGE!r}"]


def cmd_set(args: argparse.Namespace) -> int:
    from mailhub.cases.service import set_fields

    hub = hub_from(args)
    with _session(hub) as session:
        result = set_fields(session, hub, args.id, args.pairs, actor=actor())
        session.commit()
    _notes(result.notes)
    if "procedure" in result.changed:
        _notes(_plan_notes(hub, str(result.changed["procedure"])))
    if "language" in result.changed:
        _notes(_language_notes(hub, str(result.changed["language"])))
    if args.json:
        print_json({"id": result.case_id, "changed": result.changed,
                    "schedule_error": result.schedule_error})
    else:
        for key, value in result.changed.items():
            print(f"{result.case_id}: {key} = {value}")
    if result.schedule_error:
        print(f"mailhub: error: {result.case_id} was updated, but its schedule was not: "
              f"{result.schedule_error}", file=sys.stderr)
        return 1
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from mailhub.cases.export import list_cases

    hub = hub_from(args)
    with _session(hub) as session:
        rows = list_cases(session, status=args.status, clinic=args.clinic, text=args.text)
    if args.json:
        print_json(rows)
    else:
        print_table(rows, ["id", "status", "patient_email", "message_count", "procedure",
                           "clinic"], "no cases")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from mailhub.cases.export import show_case

    hub = hub_from(args)
    with _session(hub) as session:
        view = show_case(session, hub.sealer, args.id)
    if args.json:
        print_json(view)
        return 0
    print(f"{view['id']}  {view['status']}  {view['patient_name']} <{view['patient_email']}>")
    print(f"procedure: {view['procedure'] or '-'}  clinic: {view['clinic'] or '-'}  "
          f"coordinator: {view['coordinator'] or '-'}  home zone: {view['timezone']}")
    if view["merged_into"]:
        print(f"merged into {view['merged_into']}")
    for name, ev in view["events"].items():
        if ev["local"]:
            print(f"{name}: {ev['local']} {ev['timezone']} ({ev['at_utc']})")
    print()
    rows = [{**m, "to": ", ".join(m["to"]), "subject": "  " * m["depth"] + m["subject"],
             "protection": f"{m['encryption']}/{m['signature']}"} for m in view["messages"]]
    print_table(rows, ["direction", "from", "subject", "protection", "received_at"],
                "no messages", free_text={"subject"})
    print()
    print_table(view["schedule"], ["step", "template", "send_at_local", "timezone", "status"],
                "nothing scheduled")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from mailhub.cases.service import merge_cases

    hub = hub_from(args)
    with _session(hub) as session:
        result = merge_cases(session, hub, args.source, args.into, actor=actor())
        session.commit()
    if args.json:
        print_json(result)
    else:
        print(f"merged {result['source']} into {result['into']}: "
              f"{result['messages_moved']} message(s) moved")
    if result["schedule_error"]:
        print(f"mailhub: error: merged, but a schedule was not updated: "
              f"{result['schedule_error']}", file=sys.stderr)
        return 1
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from mailhub.cases.export import export_case

    hub = hub_from(args)
    with _session(hub) as session:
        result = export_case(session, hub.sealer, args.id, args.output, args.format)
    print(f"mailhub: warning: {result.path} holds the case file DECRYPTED (plaintext health "
          "information); keep it safe and delete it when the transfer is done", file=sys.stderr)
    if args.json:
        print_json({"id": result.case_id, "path": str(result.path), "format": args.format,
                    "messages": result.messages, "size": result.size})
    else:
        print(f"wrote {result.messages} message(s) to {result.path} ({args.format})")
    return 0
