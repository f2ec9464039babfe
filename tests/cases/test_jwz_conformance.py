"""The implementation-neutral threading conformance corpus (shared/conformance/threading).

Every fixture must pass; the corpus is external data (see its NOTICE), read from ../shared.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from mailhub.cases.jwz import ThreadingOptions, ThreadMessage, thread_messages

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "conformance" / "threading"
FIXTURES = sorted((CORPUS / "conformance").glob("*.json"))
EXPECTED_FIXTURE_COUNT = 37


def test_corpus_is_present_and_complete() -> None:
    assert (CORPUS / "NOTICE").is_file()
    assert len(FIXTURES) == EXPECTED_FIXTURE_COUNT


def _check_shape(fixture: dict[str, Any]) -> None:
    """The parts of schema.json the runner relies on (no extra dependency for a validator)."""
    schema = json.loads((CORPUS / "schema.json").read_text(encoding="utf-8"))
    assert set(schema["required"]) <= fixture.keys() <= set(schema["properties"])
    assert set(fixture.get("options", {})) <= set(schema["properties"]["options"]["properties"])
    message_fields = set(schema["$defs"]["message"]["properties"])
    for message in fixture["input"]:
        assert set(schema["$defs"]["message"]["required"]) <= message.keys() <= message_fields


def _options(raw: dict[str, Any]) -> ThreadingOptions:
    defaults = ThreadingOptions()
    return ThreadingOptions(
        subject_merge=raw.get("subject_merge", defaults.subject_merge),
        prune_phantoms=raw.get("prune_phantoms", defaults.prune_phantoms),
        subject_prefixes=tuple(raw.get("subject_prefixes", defaults.subject_prefixes)),
    )


def _message(raw: dict[str, Any]) -> ThreadMessage:
    return ThreadMessage(
        id=raw["id"],
        message_id=raw["message_id"],
        in_reply_to=raw.get("in_reply_to"),
        references=list(raw["references"]),
        subject=raw["subject"],
        date=datetime.fromisoformat(raw["date"]),
    )


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_fixture(path: Path) -> None:
    fixture = json.loads(path.read_text(encoding="utf-8"))
    _check_shape(fixture)
    threads = thread_messages(
        [_message(m) for m in fixture["input"]], _options(fixture.get("options", {}))
    )
    got = [{"root": t.root, "messages": t.messages} for t in threads]
    assert got == fixture["expected"]["threads"], fixture["description"]


def _unique_ids(path: Path) -> bool:
    ids = [m["message_id"] for m in json.loads(path.read_text(encoding="utf-8"))["input"]]
    present = [i for i in ids if i]
    return len(present) == len(set(present))


ORDER_FREE = [p for p in FIXTURES if _unique_ids(p)]  # with duplicates, the first one wins


@pytest.mark.parametrize("path", ORDER_FREE, ids=[p.stem for p in ORDER_FREE])
def test_membership_does_not_depend_on_input_order(path: Path) -> None:
    """Which messages share a thread follows from the headers, not from arrival order."""
    fixture = json.loads(path.read_text(encoding="utf-8"))
    opts = _options(fixture.get("options", {}))
    forward = thread_messages([_message(m) for m in fixture["input"]], opts)
    backward = thread_messages([_message(m) for m in reversed(fixture["input"])], opts)
    assert sorted(map(sorted, (t.messages for t in forward))) == sorted(
        map(sorted, (t.messages for t in backward))
    )
