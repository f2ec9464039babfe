"""A merged case's IMAP folder follows it, against a real Dovecot: its messages move into the
surviving case's folder with their flags, the old folder goes, and nothing moves twice."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

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


class _CrashAfterCopy(Exception):
    """Stands for the process dying between COPY and the delete that follows it."""


def test_a_move_interrupted_after_copy_is_finished_without_duplicates(
        dovecot_without_move: Dovecot, memory_hub: MemoryHub) -> None:
    """Without MOVE a folder moves by COPY, then delete: a crash in between leaves every
    message in both folders, and the next look must not copy them again."""
    from mailhub.cases.imap_folders import CaseFolders

    dovecot = dovecot_without_move
    a, b = make_message(SOURCE, "Jan Novak", "a"), make_message(SOURCE, "Jan Novak", "b")
    d = make_message(INTO, "Jan Novak", "d")
    drop(dovecot, a, d)
    drop(dovecot, b, flags=(b"\\Flagged",))
    assert ImapWatcher(settings_for(dovecot), memory_hub.ingest).run_once().filed == 3
    source, into = f"Cases.{SOURCE} Jan Novak", f"Cases.{INTO} Jan Novak"

    first = client_for(dovecot)
    try:
        def crash(*_args: object, **_kwargs: object) -> None:
            raise _CrashAfterCopy

        first.delete_messages = crash  # type: ignore[method-assign]
        with pytest.raises(_CrashAfterCopy):
            CaseFolders(first).move_all(source, into)
    finally:
        first.shutdown()  # the connection dies with the process
    assert len(folder_bodies(dovecot, source)) == 2  # the originals are still there
    assert len(folder_bodies(dovecot, into)) == 3  # and their copies already arrived

    again = client_for(dovecot)  # after the restart: the next look
    try:
        assert CaseFolders(again).move_all(source, into) == 2
    finally:
        again.logout()
    assert not _exists(dovecot, source)
    assert sorted(folder_bodies(dovecot, into)) == sorted(
        [PROTECTION + a, PROTECTION + b, PROTECTION + d])  # each once
    assert b"\\Flagged" in _flags(dovecot, into)[PROTECTION + b]


def test_a_message_equal_only_in_size_and_id_is_still_copied(
        dovecot_without_move: Dovecot, memory_hub: MemoryHub) -> None:
    """The check that skips copies compares whole messages: another message of the same size
    with the same Message-ID in the target does not keep one from moving."""
    from mailhub.cases.imap_folders import CaseFolders

    dovecot = dovecot_without_move
    a = make_message(SOURCE, "Jan Novak", "a")
    twin = a.replace(b"Case notes a", b"Case notes z")  # same size, same Message-ID
    assert len(twin) == len(a) and twin != a
    drop(dovecot, a)
    assert ImapWatcher(settings_for(dovecot), memory_hub.ingest).run_once().filed == 1
    source, into = f"Cases.{SOURCE} Jan Novak", f"Cases.{INTO} Jan Novak"
    c = client_for(dovecot)
    try:
        folders = CaseFolders(c)
        folders.ensure(INTO, "Jan Novak")
        c.append(into, PROTECTION + twin)
        assert folders.move_all(source, into) == 1
    finally:
        c.logout()
    assert sorted(folder_bodies(dovecot, into)) == sorted([PROTECTION + a, PROTECTION + twin])


@pytest.mark.parametrize("server", ["dovecot", "dovecot_slash"])
def test_a_renamed_patients_folder_moves_into_the_folder_of_the_new_name(
        server: str, request: pytest.FixtureRequest, memory_hub: MemoryHub) -> None:
    """A first contact's case is named after its From ("jnovak"); the coordinator then sets
    the real name: later mail files into the new name's folder, and the old folder follows."""
    dovecot: Dovecot = request.getfixturevalue(server)
    sep = dovecot.separator
    a, b = make_message(SOURCE, "jnovak", "a"), make_message(SOURCE, "Jana Nováková", "b")
    c = make_message(OTHER, "Ayşe Yılmaz", "c")
    drop(dovecot, a, c, flags=(b"\\Seen",))
    drop(dovecot, b)
    assert ImapWatcher(settings_for(dovecot), memory_hub.ingest).run_once().filed == 3
    old, new = f"Cases{sep}{SOURCE} jnovak", f"Cases{sep}{SOURCE} Jana Nováková"
    assert folder_bodies(dovecot, old) == [PROTECTION + a]

    def current(case_ids: list[str]) -> dict[str, tuple[str, str]]:  # the store's answer
        names = {SOURCE: "Jana Nováková", OTHER: "Ayşe Yılmaz"}
        return {cid: (cid, names[cid]) for cid in case_ids if cid in names}

    watcher = ImapWatcher(settings_for(dovecot), memory_hub.ingest,
                          follow_merges=MergeFollower(current, interval=0))
    watcher.run_once()
    assert not _exists(dovecot, old)
    assert sorted(folder_bodies(dovecot, new)) == sorted([PROTECTION + a, PROTECTION + b])
    assert b"\\Seen" in _flags(dovecot, new)[PROTECTION + a]
    assert folder_bodies(dovecot, f"Cases{sep}{OTHER} Ayşe Yılmaz") == [PROTECTION + c]
    watcher.run_once()  # nothing more to do
    assert len(folder_bodies(dovecot, new)) == 2


def test_the_watchers_lookup_names_every_listed_case_with_its_current_patient(
        short_tmp: Path) -> None:
    """What the serving hub answers (a real database): merged cases where they went, the
    others under their patient's current name, unknown ids left out."""
    from sqlmodel import Session

    from mailhub.cases.service import merge_cases, set_fields
    from mailhub.ingress.imap_link import ImapLink
    from tests.scheduler.sched_support import light_hub, make_case

    hub = light_hub(short_tmp / "hub")
    with Session(hub.engine) as session:
        make_case(session, SOURCE, email="a@patient.example")
        make_case(session, INTO, email="b@patient.example")
        make_case(session, OTHER, email="c@patient.example")
        set_fields(session, hub, OTHER, ["patient_name=Ayşe Yılmaz"], actor="test")
        merge_cases(session, hub, SOURCE, INTO, actor="test")
        session.commit()
    link = SimpleNamespace(hub=hub)
    assert ImapLink.merged(link, [SOURCE, INTO, OTHER, "MT-1999-0001"]) == {  # type: ignore[arg-type]
        SOURCE: (INTO, "Alex Example"), INTO: (INTO, "Alex Example"),
        OTHER: (OTHER, "Ayşe Yılmaz")}
