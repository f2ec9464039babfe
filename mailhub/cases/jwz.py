"""Display order of a case's messages: JWZ / RFC 5256 REFERENCES threading over plain data.

This decides only how the messages of ONE case are shown (``cases show``, IMAP folder order);
which case a message belongs to is threading.py's job. Behaviour follows RFC 5256 section 4
(REFERENCES) and the implementation-neutral conformance corpus in
``shared/conformance/threading`` (run by tests/cases/test_jwz_conformance.py):

- Message-IDs compare in the canonical form of ``mailhub.parse.msgid`` (quoted == unquoted,
  case kept); a message without a valid id, or REUSING an id already taken by an earlier
  message in the input, gets a private identity, so replies go to the first holder of the id;
- a message's parent is the last valid References entry; without valid References, the first
  valid In-Reply-To; links between adjacent References entries never replace an existing parent
  (References may be truncated) while the message's own parent link does; no link that would
  create a loop is made (self-references, ``a -> b -> a``);
- ids referenced but absent are phantoms. With ``prune_phantoms`` (default) a phantom inside a
  tree is dissolved into its parent, a phantom root with one child gives way to that child, and
  a phantom root with several children is kept to hold them together (RFC 5256 step 4.B); the
  ``root`` of such a thread is the phantom's bare id (``a@b``, no brackets), as when pruning is
  off;
- with ``subject_merge`` (default) a thread whose messages carry no valid threading headers at
  all joins the first (header-backed first, then oldest) thread with the same base subject
  (``subjects.base_subject``); header-backed threads are never merged with each other;
- members are ordered by (date, caller id); threads by (earliest date, root id).

Everything is iterative: a 1,000-message reply chain does not hit Python's recursion limit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from mailhub.cases.subjects import REPLY_PREFIXES, base_subject
from mailhub.parse.msgid import dedupe_and_cap, parse_msgid_list

_EPOCH = datetime.min.replace(tzinfo=UTC)  # a message without a date sorts first
_NEVER = datetime.max.replace(tzinfo=UTC)  # a subtree without any message


@dataclass(frozen=True)
class ThreadMessage:
    """One stored message as threading sees it; ``id`` is the caller's stable identity."""

    id: str
    message_id: str | None
    in_reply_to: Sequence[str] | str | None
    references: Sequence[str]
    subject: str
    date: datetime | None


@dataclass(frozen=True)
class ThreadingOptions:
    """The corpus's options; ``subject_prefixes`` replaces the default list when given."""

    subject_merge: bool = True
    prune_phantoms: bool = True
    subject_prefixes: tuple[str, ...] = REPLY_PREFIXES


@dataclass(frozen=True)
class Thread:
    """Flat thread: root caller id (or a phantom's bare Message-ID) and ordered members."""

    root: str
    messages: list[str]


@dataclass
class Node:
    """Display tree node; ``id`` is None for a phantom (a referenced but absent message)."""

    id: str | None
    message_id: str | None
    children: list[Node] = field(default_factory=list)


@dataclass
class _Container:
    message: ThreadMessage | None
    order: int
    parent: str | None = None
    children: list[str] = field(default_factory=list)


def _when(message: ThreadMessage | None) -> datetime:
    if message is None or message.date is None:
        return _EPOCH
    d = message.date
    return d if d.tzinfo is not None else d.replace(tzinfo=UTC)


def _ids(values: Iterable[str] | str | None) -> list[str]:
    """Valid canonical ids from a list of entries (each one id or a whole header value)."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for value in values:
        out.extend(parse_msgid_list(value))
    return dedupe_and_cap(out)


def _chain(message: ThreadMessage) -> list[str]:
    """The ancestry used for linking: References if any is valid, else first In-Reply-To."""
    refs = _ids(message.references)
    if refs:
        return refs
    return _ids(message.in_reply_to)[:1]


class _Table:
    """The id table of RFC 5256 step 1, and the forest built from it."""

    def __init__(self) -> None:
        self.c: dict[str, _Container] = {}
        self.by_caller: dict[str, str] = {}
        self.headers: dict[str, bool] = {}

    def ensure(self, key: str) -> _Container:
        if key not in self.c:
            self.c[key] = _Container(message=None, order=len(self.c))
        return self.c[key]

    def detach(self, key: str) -> None:
        node = self.c[key]
        if node.parent is not None:
            self.c[node.parent].children.remove(key)
            node.parent = None

    def link(self, parent: str, child: str, *, replace: bool) -> None:
        if not replace and self.c[child].parent is not None:
            return  # checked first: it is cheap and the common case in long References
        cur: str | None = parent
        while cur is not None:  # would the link close a loop?
            if cur == child:
                return
            cur = self.c[cur].parent
        self.detach(child)  # only reached with replace=True, or when there is no parent
        self.c[child].parent = parent
        self.c[parent].children.append(child)

    def add(self, message: ThreadMessage) -> None:
        if not message.id or message.id in self.by_caller:
            return
        own = _ids(message.message_id)[:1]
        key = own[0] if own else ""
        if not key or (key in self.c and self.c[key].message is not None):
            key = f"synthetic:{message.id}"
        self.ensure(key).message = message
        self.by_caller[message.id] = key
        chain = _chain(message)
        self.headers[message.id] = bool(chain)
        for ref in chain:
            self.ensure(ref)
        for parent, child in zip(chain, chain[1:], strict=False):
            self.link(parent, child, replace=False)
        if chain:
            self.link(chain[-1], key, replace=True)
        else:
            self.detach(key)

    def roots(self) -> list[str]:
        return [k for k, v in self.c.items() if v.parent is None]

    def postorder(self, roots: list[str]) -> list[str]:
        out: list[str] = []
        stack = list(roots)
        while stack:
            key = stack.pop()
            out.append(key)
            stack.extend(self.c[key].children)
        out.reverse()
        return out

    def prune(self) -> None:
        """RFC 5256 step 4 (see the module docstring), bottom-up, iteratively."""
        roots = self.roots()
        gone: list[str] = []
        for key in self.postorder(roots):
            node = self.c[key]
            kids: list[str] = []
            for child in node.children:
                if self.c[child].message is None:
                    kids.extend(self.c[child].children)
                    gone.append(child)
                else:
                    kids.append(child)
            for child in kids:
                self.c[child].parent = key
            node.children = kids
        for key in roots:
            node = self.c[key]
            if node.message is None and len(node.children) <= 1:
                for child in node.children:
                    self.c[child].parent = None
                gone.append(key)
        for key in gone:
            del self.c[key]

    def earliest(self) -> dict[str, datetime]:
        best: dict[str, datetime] = {}
        for key in self.postorder(self.roots()):
            node = self.c[key]
            dates = [best[k] for k in node.children if best[k] != _NEVER]
            if node.message is not None:
                dates.append(_when(node.message))
            best[key] = min(dates) if dates else _NEVER
        return best


@dataclass
class _Group:
    root_key: str
    root: str
    messages: list[str]
    extra_roots: list[str] = field(default_factory=list)


def _build(
    messages: Iterable[ThreadMessage], options: ThreadingOptions
) -> tuple[_Table, list[_Group], dict[str, datetime]]:
    table = _Table()
    for message in messages:
        table.add(message)
    real = {k for k, v in table.c.items() if v.message is not None}
    if options.prune_phantoms:
        table.prune()
    first = table.earliest()

    def sort_key(key: str) -> tuple[datetime, int, str]:
        return (first[key], table.c[key].order, key)

    for node in table.c.values():
        node.children.sort(key=sort_key)
    msg_date = {table.c[k].message.id: _when(table.c[k].message) for k in real if k in table.c}

    def member_key(caller_id: str) -> tuple[datetime, str]:
        return (msg_date[caller_id], caller_id)

    groups: list[_Group] = []
    for key in sorted(table.roots(), key=sort_key):
        members = [
            table.c[k].message.id for k in table.postorder([key]) if table.c[k].message is not None
        ]
        if not members:
            continue
        node = table.c[key]
        label = node.message.id if node.message is not None else key.strip("<>")
        groups.append(_Group(key, label, sorted(members, key=member_key)))

    def group_key(g: _Group) -> tuple[datetime, str]:
        return (msg_date[g.messages[0]], g.root)

    if options.subject_merge:
        groups = _merge_by_subject(groups, table, options, group_key, member_key)
    groups.sort(key=group_key)
    return table, groups, first


def _merge_by_subject(
    groups: list[_Group],
    table: _Table,
    options: ThreadingOptions,
    group_key: Callable[[_Group], tuple[datetime, str]],
    member_key: Callable[[str], tuple[datetime, str]],
) -> list[_Group]:
    """Headerless threads join the first thread with the same base subject."""
    subjects = {m.id: m.subject for m in (v.message for v in table.c.values()) if m is not None}

    def backed(g: _Group) -> bool:
        return any(table.headers.get(cid, False) for cid in g.messages)

    ordered = sorted(groups, key=lambda g: (not backed(g), group_key(g)))
    merged: list[_Group] = []
    by_subject: dict[str, _Group] = {}
    for g in ordered:
        key = base_subject(subjects[g.messages[0]], options.subject_prefixes)
        target = by_subject.get(key) if key else None
        if target is not None and not backed(g):
            target.messages = sorted(set(target.messages) | set(g.messages), key=member_key)
            target.extra_roots.append(g.root_key)
            continue
        if key:
            by_subject.setdefault(key, g)
        merged.append(g)
    return merged


def thread_messages(
    messages: Iterable[ThreadMessage], options: ThreadingOptions | None = None
) -> list[Thread]:
    """Flat threads (the corpus's output shape)."""
    _, groups, _ = _build(messages, options or ThreadingOptions())
    return [Thread(g.root, g.messages) for g in groups]


def thread_tree(
    messages: Iterable[ThreadMessage], options: ThreadingOptions | None = None
) -> list[Node]:
    """One tree per thread; subject-merged threads hang under the root they joined."""
    table, groups, first = _build(messages, options or ThreadingOptions())
    out: list[Node] = []
    for g in groups:
        nodes: dict[str, Node] = {}
        for key in table.postorder([g.root_key, *g.extra_roots]):
            c = table.c[key]
            mid = None if key.startswith("synthetic:") else key
            nodes[key] = Node(
                c.message.id if c.message else None, mid, [nodes[k] for k in c.children]
            )
        root = nodes[g.root_key]
        extras = sorted(g.extra_roots, key=lambda k: (first[k], table.c[k].order, k))
        root.children.extend(nodes[k] for k in extras)
        out.append(root)
    return out


def display_order(
    messages: Iterable[ThreadMessage], options: ThreadingOptions | None = None
) -> list[tuple[str, int]]:
    """Caller ids with their indentation depth, threads in order, each depth-first by date."""
    rows: list[tuple[str, int]] = []
    for root in thread_tree(messages, options):
        stack: list[tuple[Node, int]] = [(root, 0)]
        while stack:
            node, depth = stack.pop()
            if node.id is not None:
                rows.append((node.id, depth))
            child_depth = depth + 1 if node.id is not None else depth
            stack.extend((child, child_depth) for child in reversed(node.children))
    return rows
