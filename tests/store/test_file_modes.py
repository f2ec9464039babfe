"""The database file and its -wal/-shm companions are the hub's alone (0600), like the spool,
the payload segments and the keys, even in a data folder others can enter."""

from __future__ import annotations

import stat
from pathlib import Path

from sqlalchemy import text

from mailhub.store.db import make_engine, migrate


def test_new_sqlite_database_and_its_wal_are_private(tmp_path: Path) -> None:
    data = tmp_path / "var"
    data.mkdir(mode=0o755)  # an existing folder such as /var/lib/mailhub
    data.chmod(0o755)
    engine = make_engine(f"sqlite:///{data / 'mailhub.db'}")
    try:
        migrate(engine)
        with engine.begin() as conn:  # a write: the -wal and -shm files exist now
            conn.execute(text("CREATE TABLE IF NOT EXISTS t (x INTEGER)"))
            conn.execute(text("INSERT INTO t VALUES (1)"))
            files = sorted(data.iterdir())
            assert {f.name for f in files} >= {"mailhub.db", "mailhub.db-wal", "mailhub.db-shm"}
            for f in files:
                assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    finally:
        engine.dispose()
