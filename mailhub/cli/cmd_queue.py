"""``queue list|release|drop``."""

from __future__ import annotations

import argparse
import getpass
import os
from typing import Any

from mailhub.cli.output import add_json, hub_from, iso, print_json, print_table


def queue_id(text: str) -> int:
    """A queue id as the database can hold it: a number past 64 bits was an internal error
    (OverflowError from SQLite) instead of a usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a queue id (a number)") from None
    if not 0 < value < 2**63:
        raise argparse.ArgumentTypeError(f"{text} is not a queue id: see 'mailhub queue list'")
    return value


def register(sub: Any) -> None:
    q = sub.add_parser("queue", help="outbound messages: queued, held (and why), sent, failed")
    qs = q.add_subparsers(dest="queue_cmd", required=True, metavar="ACTION")
    p = qs.add_parser("list", help="one row per recipient")
    p.add_argument("--status", choices=["queued", "held", "sent", "failed"])
    add_json(p)
    p.set_defaults(func=cmd_list)
    p = qs.add_parser("release", help="evaluate a held message again (e.g. after a key import)")
    p.add_argument("id", type=queue_id)
    p.set_defaults(func=cmd_release)
    p = qs.add_parser("drop", help="discard a held or queued message (recorded with who and why)")
    p.add_argument("id", type=queue_id)
    p.add_argument("--reason", required=True, help="why it is dropped (kept in the audit log)")
    p.set_defaults(func=cmd_drop)


def cmd_list(args: argparse.Namespace) -> int:
    from mailhub.deliver.queue import list_items

    hub = hub_from(args)
    rows = [{"id": r.id, "recipient": r.recipient, "status": r.status, "reason": r.reason,
             "message_id": r.message_id, "sender": r.sender, "method": r.method or None,
             "kind": r.kind, "case": r.case_id, "attempts": r.attempts,
             "created_at": iso(r.created_at), "updated_at": iso(r.updated_at)}
            for r in list_items(hub.engine, args.status)]
    if args.json:
        print_json(rows)
    else:
        print_table(rows, ["id", "status", "recipient", "method", "message_id", "reason"],
                    "the queue is empty", free_text={"reason"})
    return 0


def _actor() -> str:
    return f"cli:{os.environ.get('SUDO_USER') or getpass.getuser()}"


def cmd_release(args: argparse.Namespace) -> int:
    from mailhub.outbound.release import release

    hub = hub_from(args)
    row = release(hub, args.id, actor=_actor())
    if row.status == "queued":
        print(f"released {row.id}: queued for {row.recipient} ({row.method})")
        return 0
    print(f"still held {row.id}: {row.reason}")
    return 1


def cmd_drop(args: argparse.Namespace) -> int:
    from mailhub.outbound.release import drop

    hub = hub_from(args)
    row = drop(hub, args.id, actor=_actor(), why=args.reason)
    print(f"dropped {row.id} ({row.recipient}): {args.reason}")
    return 0
