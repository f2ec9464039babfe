"""The key snapshot the outbound policy reads: concurrent first readers all see the keys."""

from __future__ import annotations

import threading
from pathlib import Path

from sqlmodel import Session

from mailhub.crypto.registry import KeySnapshot
from mailhub.policy.outbound import choose_key
from mailhub.store.db import make_engine, migrate
from mailhub.store.models import KeyRecord

ADDRESS = "records@clinic-a.example"


def test_concurrent_first_lookups_all_see_the_key(tmp_path: Path) -> None:
    """Right after a start, several batches ask at once: none may get the empty map (that
    would hold a message whose recipient has a key)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'keys.db'}")
    migrate(engine)
    with Session(engine) as session:
        for n in range(300):  # enough rows that loading them takes a while
            session.add(KeyRecord(address=f"other{n}@x.example", kind="openpgp",
                                  fingerprint=f"{n:040X}"))
        session.add(KeyRecord(address=ADDRESS, kind="openpgp", fingerprint="AB" * 20))
        session.commit()
    misses = 0
    for _ in range(20):
        snapshot = KeySnapshot(engine, check_every=60)
        start = threading.Barrier(8)
        seen: list[int] = []

        def ask(snap: KeySnapshot = snapshot, barrier: threading.Barrier = start,
                out: list[int] = seen) -> None:
            barrier.wait()
            out.append(len(snap.candidates(ADDRESS.upper())))

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        misses += seen.count(0)
        assert len(seen) == 8
    engine.dispose()
    assert misses == 0


def test_a_change_is_seen_after_check_every(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'keys.db'}")
    migrate(engine)
    snapshot = KeySnapshot(engine, check_every=0)
    assert snapshot.candidates(ADDRESS) == ()
    with Session(engine) as session:
        session.add(KeyRecord(address=ADDRESS, kind="smime", fingerprint="CD" * 20))
        session.commit()
    assert [c.kind for c in snapshot.candidates(ADDRESS)] == ["smime"]
    engine.dispose()


def test_the_key_imported_last_is_the_one_used(tmp_path: Path) -> None:
    """A partner's renewed key or certificate, imported by hand, replaces the old one for new
    mail at once (both rows are kept, and the old one may still be valid for a while)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'keys.db'}")
    migrate(engine)
    snapshot = KeySnapshot(engine, check_every=0)
    for kind, old, new in (("openpgp", "AB" * 20, "CD" * 20), ("smime", "ab" * 32, "cd" * 32)):
        address = f"{kind}-{ADDRESS}"
        for fpr in (old, new):
            with Session(engine) as session:
                session.add(KeyRecord(address=address, kind=kind, fingerprint=fpr))
                session.commit()
        key, _why = choose_key(snapshot.candidates(address), address, None)
        assert key is not None and key.fingerprint == new
    engine.dispose()
