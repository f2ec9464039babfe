"""Traces serialise to JSON for the record and log one safe line per rule."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from mailhub.policy.outbound import KeyCandidate, RecipientContext, decide_recipient
from mailhub.policy.rules import load_policy
from mailhub.policy.trace import (
    RuleHit,
    format_decision_lines,
    hits,
    log_decision,
    misses,
    trace_from_json,
    trace_to_json,
)

REPO_RULES = Path(__file__).resolve().parents[2] / "rules"


def test_json_round_trip_keeps_order() -> None:
    trace = (RuleHit("a", False, "x"), RuleHit("b", True, "ünïcode \"quoted\""))
    text = trace_to_json(trace)
    assert json.loads(text) == [{"rule": "a", "hit": False, "detail": "x"},
                                {"rule": "b", "hit": True, "detail": "ünïcode \"quoted\""}]
    assert trace_from_json(text) == trace
    assert hits(trace) == ["b"] and misses(trace) == ["a"]
    assert trace_from_json("") == ()
    with pytest.raises(ValueError):
        trace_from_json('{"rule": "a"}')


def test_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    d = decide_recipient(RecipientContext(
        "p@mail.example", "medvoyage.example", False,
        (KeyCandidate("openpgp", "A" * 40, True, "", "imported"),)), load_policy(REPO_RULES))
    with caplog.at_level(logging.DEBUG, logger="mailhub.policy"):
        log_decision("<abc@x.example>", d.trace, recipient="p@mail.example")
    records = [r for r in caplog.records if r.name == "mailhub.policy"]
    debug = [r.getMessage() for r in records if r.levelno == logging.DEBUG]
    info = [r.getMessage() for r in records if r.levelno == logging.INFO]
    assert len(debug) == len(d.trace) == 4  # every hit and miss, at DEBUG
    assert debug[0].startswith("decision message_id=<abc@x.example> recipient=p@mail.example "
                               "rule=invalid-address hit=no")
    assert "rule=usable-key hit=yes" in debug[-1] and "A" * 40 in debug[-1]
    assert len(info) == 1 and "rule=usable-key hit=yes" in info[0]  # the deciding rule
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mailhub.policy"):
        log_decision("<abc@x.example>", d.trace, recipient="p@mail.example")
    assert [r.getMessage() for r in caplog.records if r.name == "mailhub.policy"] == info


def test_log_values_cannot_forge_lines() -> None:
    lines = format_decision_lines("<a@b>\ndecision message_id=forged rule=x hit=yes",
                                  [RuleHit("r", True, "two words")])
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith('decision message_id="<a@b>decision message_id=forged')
    assert lines[0].endswith('rule=r hit=yes detail="two words"')
    assert format_decision_lines("", [RuleHit("r", False)]) == ["decision message_id=- rule=r hit=no"]
