"""Table output for people: identifiers are printed whole, long free text is cut visibly.

A fingerprint copied from `keys list` must be the real one; a cut reason must show it was cut.
`--json` stays complete.
"""

from __future__ import annotations

import json
import re

from sqlmodel import Session

from mailhub.app import Hub
from mailhub.config import load_config
from mailhub.deliver.queue import insert_item
from mailhub.errors import NoRecipientKey
from tests.conftest import Instance

LONG_ADDRESS = "coordinator.of.international.patient.journeys@clinic-partner-network.example"


def test_keys_list_prints_whole_fingerprints(instance: Instance) -> None:
    rows = json.loads(instance.run("keys", "list", "--json")[1])
    smime = [r["fingerprint"] for r in rows if r["kind"] == "smime"]
    assert smime and all(re.fullmatch(r"[0-9a-f]{64}", f) for f in smime)  # a real 64-hex row
    code, out, err = instance.run("keys", "list")
    assert code == 0, err
    printed = set(out.split())
    for r in rows:
        assert r["fingerprint"] in printed, (r["fingerprint"], out)
        assert r["address"] in printed


def test_queue_list_cuts_long_reasons_with_a_marker_and_never_ids(instance: Instance) -> None:
    reason = str(NoRecipientKey(LONG_ADDRESS, "no OpenPGP key or S/MIME certificate is known"))
    message_id = "<" + "a1b2c3d4" * 8 + "@submission.medvoyage.example>"
    hub = Hub(load_config(instance.config))
    try:
        with Session(hub.engine) as session:
            insert_item(session, source_id="s1", recipient=LONG_ADDRESS, status="held",
                        reason=reason, message_id=message_id, sender="anna@medvoyage.example")
            session.commit()
    finally:
        hub.engine.dispose()

    code, out, err = instance.run("queue", "list")
    assert code == 0, err
    row = out.splitlines()[1]
    assert LONG_ADDRESS in row.split() and message_id in row.split()
    shown = row[row.index(message_id) + len(message_id):].strip()
    assert shown.endswith("\u2026") and len(shown) <= 60
    assert reason.startswith(shown[:-1])  # the start of the real reason, cut where marked

    listed = json.loads(instance.run("queue", "list", "--json")[1])
    assert [(r["recipient"], r["reason"], r["message_id"]) for r in listed] == [
        (LONG_ADDRESS, reason, message_id)]
