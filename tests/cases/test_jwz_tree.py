"""Display trees and order beyond the corpus: siblings under a missing parent, deep chains."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from mailhub.cases.jwz import (
    Node,
    Thread,
    ThreadingOptions,
    ThreadMessage,
    display_order,
    thread_messages,
    thread_tree,
)

T0 = datetime(2026, 5, 15, 9, 0, tzinfo=UTC)


def m(
    cid: str,
    mid: str | None,
    refs: list[str] | None = None,
    irt: str | None = None,
    subject: str = "Topic",
    minutes: int = 0,
) -> ThreadMessage:
    return ThreadMessage(cid, mid, irt, refs or [], subject, T0 + timedelta(minutes=minutes))


def shape(node: Node) -> tuple[str | None, list[object]]:
    return (node.id, [shape(c) for c in node.children])


def test_replies_to_a_missing_parent_stay_together() -> None:
    msgs = [
        m("r1", "<r1@x>", ["<gone@x>"], minutes=5),
        m("r2", "<r2@x>", ["<gone@x>"], minutes=6),
        m("r1a", "<r1a@x>", ["<gone@x>", "<r1@x>"], minutes=7),
    ]
    assert thread_messages(msgs) == [Thread("gone@x", ["r1", "r2", "r1a"])]
    [tree] = thread_tree(msgs)
    assert tree.id is None and tree.message_id == "<gone@x>"
    assert shape(tree) == (None, [("r1", [("r1a", [])]), ("r2", [])])
    assert display_order(msgs) == [("r1", 0), ("r1a", 1), ("r2", 0)]


def test_inner_phantoms_are_dissolved_or_kept_by_option() -> None:
    msgs = [
        m("root", "<root@x>"),
        m("leaf", "<leaf@x>", ["<root@x>", "<mid@x>"], minutes=5),
    ]
    assert shape(thread_tree(msgs)[0]) == ("root", [("leaf", [])])
    kept = thread_tree(msgs, ThreadingOptions(prune_phantoms=False))[0]
    assert shape(kept) == ("root", [(None, [("leaf", [])])])
    assert kept.children[0].message_id == "<mid@x>"


def test_subject_merged_message_hangs_under_the_thread_root() -> None:
    msgs = [
        m("root", "<root@x>", subject="Visa letter"),
        m("reply", "<reply@x>", ["<root@x>"], subject="Re: Visa letter", minutes=5),
        m("loose", "<loose@x>", subject="AW: Visa letter", minutes=9),
    ]
    assert display_order(msgs) == [("root", 0), ("reply", 1), ("loose", 1)]
    off = ThreadingOptions(subject_merge=False)
    assert display_order(msgs, off) == [("root", 0), ("reply", 1), ("loose", 0)]


def test_a_thousand_message_chain_does_not_recurse() -> None:
    msgs = [m("c0", "<c0@x>")]
    for i in range(1, 1000):
        msgs.append(
            m(f"c{i}", f"<c{i}@x>", [f"<c{j}@x>" for j in range(max(0, i - 100), i)], minutes=i)
        )
    rows = display_order(list(reversed(msgs)))
    assert rows[0] == ("c0", 0)
    assert rows[-1] == ("c999", 999)
    assert len(thread_messages(msgs)) == 1


def test_dates_may_be_naive_or_missing_and_caller_ids_unique() -> None:
    msgs = [
        ThreadMessage("b", "<b@x>", None, [], "B", datetime(2026, 5, 15, 10, 0)),
        ThreadMessage("a", "<a@x>", None, [], "A", None),
        ThreadMessage("a", "<other@x>", None, [], "dup caller id", T0),
    ]
    assert thread_messages(msgs) == [Thread("a", ["a"]), Thread("b", ["b"])]


def test_raw_header_values_are_accepted_as_entries() -> None:
    msgs = [
        m("p", '<"p"@x>'),
        m("c", "<c@x>", ["junk <p@x> (comment)"], minutes=1),
        m("d", "<d@x>", irt="Your message <c@x> of Monday", minutes=2),
    ]
    assert thread_messages(msgs) == [Thread("p", ["p", "c", "d"])]
