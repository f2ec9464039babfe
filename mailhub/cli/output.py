"""Printing for the CLI: JSON only with --json, otherwise aligned columns for people."""

from __future__ import annotations

import argparse
import json
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from mailhub.app import Hub
from mailhub.config import load_config


def hub_from(args: argparse.Namespace, *, migrate: bool = True) -> Hub:
    """The instance a command works on; refused when ``init`` never made it (a config file
    copied elsewhere would otherwise get an empty database and keyring of its own, and
    ``keys list`` would just say there are no keys)."""
    hub = Hub(load_config(args.config))
    hub.sealer  # noqa: B018 - loads the at-rest key, which is the Hub's own check for an instance
    if migrate:
        hub.migrate()
    return hub


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON only")


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        from datetime import UTC

        value = value.replace(tzinfo=UTC)
    return value.isoformat()


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


FREE_TEXT_WIDTH = 60
ELLIPSIS = "\u2026"


def shorten(text: str, width: int = FREE_TEXT_WIDTH) -> str:
    """``text`` in at most ``width`` characters, a cut marked with "\u2026" (never silent)."""
    return text if len(text) <= width else text[: width - 1].rstrip() + ELLIPSIS


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], empty: str, *,
                free_text: Collection[str] = ()) -> None:
    """Aligned columns for people; ``--json`` is the complete form.

    Only the ``free_text`` columns (reasons, subjects, warnings) are shortened, with a visible
    marker: every other cell (fingerprints, ids, addresses) is printed whole, since a cut
    identifier copied from the terminal would be a different, wrong one.
    """
    if not rows:
        print(empty)
        return
    texts = [[_cell(r.get(c), c in free_text) for c in columns] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in texts)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for t in texts:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths, strict=True)).rstrip())


def _cell(value: Any, free: bool) -> str:
    """One cell's text: whole for identifiers, shortened on one line for free text."""
    if value is None:
        return ""
    if not free:
        return str(value)
    return shorten(" ".join(str(value).splitlines()))  # a line break would split the row
