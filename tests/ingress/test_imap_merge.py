"""A merged case's IMAP folder follows it, against a real Dovecot: its messages move into the
surviving case's folder with their flags, the old folder goes, and nothing moves twice."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mailhub.cases.folder_merge import MergeFollower
from mailhub.ingress.imap_watcher import ImapWatcher
from tests.ingress.dovecot import Dovecot
from tests.ingress.imap_support import (
    PROTECTION,
    MemoryHub,
    client_for,
    drop,
    folder_bodies,
    make_message,
    settings_for,
)

SOURCE, INTO, OTHER = "MT-2026-0042", "MT-2026-0050", "MT-2026-0043"


def _flags(dovecot: Dovecot, folder: str) -> dict[bytes, set[bytes]]:
    c = client_for(dovecot)
    try:
        c.select_folder(folder, readonly=True)
        return {v[b"BODY[]"]: set(v[b"FLAGS"])
                for v in c.fetch(c.search("ALL"), ["FLAGS", "BODY.PEEK[]"]).values()}
    finally:
        c.logout()


def _exists(dovecot: Dovecot, folder: str) -> bool:
    c = client_for(dovecot)
    try:
        return bool(c.folder_exists(folder))
    finally:
        c.logout()


@pytest.fixture
def dovecot_without_move() -> Iterator[Dovecot]:
    """A server that does not offer MOVE (RFC 6851): the folder moves by COPY, then delete."""
    with Dovecot(capability="IMAP4rev1 LITERAL+ NAMESPACE UIDPLUS IDLE") as server:
        yield server


@pytest.mark.parametrize("server", ["dovecot", "dovecot_slash", "dovecot_without_move"])
def test_a_merged_cases_folder_moves_into_the_surviving_one(server: str,
                                                            request: pytest.FixtureRequest,
                                                            memory_hub: MemoryHub) -> None:
    dovecot: Dovecot = request.getfixturevalue(server)  # "." and "/" hierarchies, no MOVE
    sep = dovecot.separator
    with client_for(dovecot) as c:
        assert c.has_capability("MOVE") == (server != "dovecot_without_move")
    a = make_message(SOURCE, "Jan Novak", "a")
    b = make_message(SOURCE, "Jan Novak", "b")
    c = make_message(OTHER, "Ayşe Yılmaz", "c")
    d = make_message(INTO, "Jan Novak", "d")
    drop(dovecot, a, c, d)
    drop(dovecot, b, flags=(b"\\Flagged",))
    assert ImapWatcher(settings_for(dovecot), memory_hub.ingest).run_once().filed == 4
    source = f"Cases{sep}{SOURCE} Jan Novak"
    into = f"Cases{sep}{INTO} Jan Novak"
    assert len(folder_bodies(dovecot, source)) == 2

    asked: list[list[str]] = []

    def merged(case_ids: list[str]) -> dict[str, tuple[str, str]]:  # the store's answer
        asked.append(case_ids)
        return {SOURCE: (INTO, "Jan Novak")} if SOURCE in case_ids else {}

    follower = MergeFollower(merged, interval=0)
    watcher = ImapWatcher(settings_for(dovecot), memory_hub.ingest, follow_merges=follower)
    watcher.run_once()

    assert asked == [sorted([SOURCE, INTO, OTHER])]  # the case folders the server listed
    assert not _exists(dovecot, source)
    assert sorted(folder_bodies(dovecot, into)) == sorted(
        [PROTECTION + a, PROTECTION + b, PROTECTION + d])
    assert b"\\Flagged" in _flags(dovecot, into)[PROTECTION + b]  # flags travel along
    assert folder_bodies(dovecot, f"Cases{sep}{OTHER} Ayşe Yılmaz") == [PROTECTION + c]

    watcher.run_once()  # the next look finds nothing to move
    assert asked[-1] == sorted([INTO, OTHER])
    assert len(folder_bodies(dovecot, into)) == 3


def test_the_follower_looks_at_most_once_an_interval() -> None:
    now = [1000.0]
    calls: list[int] = []

    class Folders:  # only what move_merged_folders asks of a CaseFolders: the listing
        def listed(self) -> dict[str, str]:
            calls.append(1)
            return {}

    follower = MergeFollower(lambda ids: {}, interval=60, clock=lambda: now[0])
    for step in (0, 30, 59, 61, 100, 122):
        now[0] = 1000.0 + step
        follower.maybe_run(Folders())  # type: ignore[arg-type]
    assert len(calls) == 3  # at 0, 61 and 122 s
