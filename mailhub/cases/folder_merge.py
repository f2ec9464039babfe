"""A merged case's IMAP folder follows it: its messages move into the surviving case's folder.
So does a renamed case's: the folder named after the old patient name moves into the new one.

``mailhub cases merge`` changes the database only (it needs no IMAP connection and must not
fail half-way on one). The serving process's IMAP watcher then looks, at most once a
``interval``, at the case folders the server lists, asks the store which of those cases were
merged (and into which case, following chains of merges), and moves their messages over with
flags and dates kept; the emptied folder is deleted. Nothing is lost or filed twice on a crash
in between: whatever is still in the old folder is moved at the next look, and a server without
MOVE does not get a second copy of what an interrupted COPY already put there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from mailhub.cases.imap_folders import CaseFolderError, CaseFolders

log = logging.getLogger("mailhub.imap")

# case ids -> {case id: (the case its mail lives in now, that case's patient name)}; a case
# left out is left alone
MergedLookup = Callable[[list[str]], dict[str, tuple[str, str]]]


def move_merged_folders(folders: CaseFolders, merged: MergedLookup) -> int:
    """One look: move the folders of merged cases, and those named after a patient name the
    case no longer has (``cases set ID patient_name=...``), into the folder the case's mail
    goes to now; how many messages moved."""
    listed = folders.listed()
    if not listed:
        return 0
    moved = 0
    for case_id, (into, patient_name) in merged(sorted(listed)).items():
        sources = listed.get(case_id) or []
        if into == case_id and sources == [folders.folder_for(into, patient_name)]:
            continue  # the usual case, decided without asking the server
        target = folders.ensure(into, patient_name)
        for source in sources:
            if source == target:
                continue
            n = folders.move_all(source, target)
            moved += n
            why = f"was merged into {into}" if into != case_id else "has a new patient name"
            log.info("case %s %s: moved %d message(s) from IMAP folder %r to %r",
                     case_id, why, n, source, target)
    return moved


class MergeFollower:
    """``move_merged_folders`` at most once per ``interval`` seconds (called on every pass of
    the IMAP watcher, which may wake many times a minute); a failure waits for the next look."""

    def __init__(self, merged: MergedLookup, interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.merged = merged
        self.interval = interval
        self.clock = clock
        self._next = 0.0

    def maybe_run(self, folders: CaseFolders) -> int:
        now = self.clock()
        if now < self._next:
            return 0
        self._next = now + self.interval
        try:
            return move_merged_folders(folders, self.merged)
        except CaseFolderError as exc:  # the server refused: watching goes on, tried again later
            log.warning("moving merged cases' IMAP folders failed: %s (tried again in %.0f s)",
                        exc, self.interval)
            return 0
