"""Decision traces: every rule a decision looked at, hit or miss, in the order it looked.

A trace goes on the message's record as JSON (``trace_to_json``) and into the log as one line
per rule on logger ``mailhub.policy``::

    decision message_id=<id> recipient=<addr> rule=<name> hit=<yes|no> detail="..."

Details name addresses, rules and key fingerprints, never a body, a key or a password.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("mailhub.policy")

_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class RuleHit:
    """One rule's verdict: ``hit`` is true when its condition matched (and it may have decided)."""

    rule: str
    hit: bool
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "hit": self.hit, "detail": self.detail}


def trace_to_list(trace: Iterable[RuleHit]) -> list[dict[str, Any]]:
    return [h.as_dict() for h in trace]


def trace_to_json(trace: Iterable[RuleHit]) -> str:
    """The trace as compact JSON text, for a column on the message's record."""
    return json.dumps(trace_to_list(trace), ensure_ascii=False, separators=(",", ":"))


def trace_from_json(text: str) -> tuple[RuleHit, ...]:
    """Read back what ``trace_to_json`` wrote (for ``queue list`` and ``cases show``)."""
    data = json.loads(text) if text else []
    if not isinstance(data, list):
        raise ValueError("a decision trace is a JSON list")
    return tuple(RuleHit(str(d["rule"]), bool(d["hit"]), str(d.get("detail", ""))) for d in data)


def hits(trace: Iterable[RuleHit]) -> list[str]:
    """Names of the rules that matched, in order."""
    return [h.rule for h in trace if h.hit]


def misses(trace: Iterable[RuleHit]) -> list[str]:
    """Names of the rules that did not match, in order."""
    return [h.rule for h in trace if not h.hit]


def _value(text: str) -> str:
    """One log field: control characters dropped (no forged lines), quoted when it has spaces."""
    clean = _UNSAFE.sub("", text)
    if clean and not any(c in clean for c in ' "='):
        return clean
    return json.dumps(clean, ensure_ascii=False)


def format_decision_lines(message_id: str, trace: Iterable[RuleHit], *,
                          recipient: str | None = None) -> list[str]:
    """The log lines for one decision, one per rule, without logging them."""
    prefix = f"decision message_id={_value(message_id or '-')}"
    if recipient:
        prefix += f" recipient={_value(recipient)}"
    lines = []
    for h in trace:
        line = f"{prefix} rule={_value(h.rule)} hit={'yes' if h.hit else 'no'}"
        if h.detail:
            line += f" detail={_value(h.detail)}"
        lines.append(line)
    return lines


def log_decision(message_id: str, trace: Iterable[RuleHit], *, recipient: str | None = None,
                 logger: logging.Logger | None = None, level: int = logging.DEBUG) -> None:
    """Log a decision on ``mailhub.policy``: the deciding rule at INFO, every rule at ``level``.

    Every rule (hits and misses) is also kept on the message's record; the log keeps one line
    per decision at INFO so a busy relay does not spend its time formatting misses.
    """
    target = logger or log
    trace = tuple(trace)
    if target.isEnabledFor(level):
        for line in format_decision_lines(message_id, trace, recipient=recipient):
            target.log(level, "%s", line)
    if level < logging.INFO and target.isEnabledFor(logging.INFO):
        hit = [t for t in trace if t.hit][-1:]
        for line in format_decision_lines(message_id, hit, recipient=recipient):
            target.info("%s", line)
