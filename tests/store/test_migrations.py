"""The migrations build exactly the schema the models describe (a model change without its
migration would pass every test on a fresh database and fail on an upgraded one)."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

from mailhub.store import schema  # noqa: F401 - every table in the metadata
from mailhub.store.db import make_engine, migrate, schema_revision


def test_migrated_schema_matches_the_models(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.sqlite'}")
    try:
        migrate(engine)
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == []
        assert schema_revision(engine) == "0005"
    finally:
        engine.dispose()


def test_upgrades_build_the_sweep_index_and_then_make_it_partial(tmp_path: Path) -> None:
    from alembic import command
    from sqlalchemy import inspect

    from mailhub.store.db import _alembic_config

    def indexes() -> set[str]:
        return {i["name"] for i in inspect(engine).get_indexes("outbound")}

    engine = make_engine(f"sqlite:///{tmp_path / 'hub.sqlite'}")
    try:
        command.upgrade(_alembic_config(engine), "0001")
        assert not {"ix_outbound_finished", "ix_outbound_unswept"} & indexes()
        command.upgrade(_alembic_config(engine), "0002")
        assert "ix_outbound_finished" in indexes()
        migrate(engine)
        assert "ix_outbound_unswept" in indexes() and "ix_outbound_finished" not in indexes()
        with engine.connect() as conn:  # partial: only rows that still hold a payload
            sql = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = "
                                       "'ix_outbound_unswept'").scalar_one()
        assert "WHERE payload_id IS NOT NULL" in sql
    finally:
        engine.dispose()


def test_sqlite_connections_free_pages_without_zeroing_them(tmp_path: Path) -> None:
    # the payload sweep frees about 70 pages a 200 KiB message: zeroing them (Debian's SQLite
    # default) wrote as much to the WAL as the messages had
    from sqlalchemy import text

    engine = make_engine(f"sqlite:///{tmp_path / 'hub.sqlite'}")
    try:
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA secure_delete")).scalar() == 2  # FAST
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    finally:
        engine.dispose()


def test_the_write_ahead_log_shrinks_back_after_a_burst(tmp_path: Path) -> None:
    from sqlalchemy import text

    from mailhub.store.db import WAL_SIZE_LIMIT

    path = tmp_path / "hub.sqlite"
    engine = make_engine(f"sqlite:///{path}")
    wal = tmp_path / "hub.sqlite-wal"
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE blobs (id INTEGER PRIMARY KEY, data BLOB)"))
        with engine.begin() as conn:  # a burst: one transaction larger than the limit
            for _ in range(WAL_SIZE_LIMIT // (1 << 20) + 16):
                conn.execute(text("INSERT INTO blobs (data) VALUES (randomblob(1048576))"))
        burst = wal.stat().st_size
        assert burst > WAL_SIZE_LIMIT
        with engine.begin() as conn:
            conn.execute(text("PRAGMA wal_checkpoint(PASSIVE)"))
        with engine.begin() as conn:  # writing starts over at the log's beginning
            conn.execute(text("INSERT INTO blobs (data) VALUES (x'00')"))
        assert wal.stat().st_size <= WAL_SIZE_LIMIT < burst
    finally:
        engine.dispose()


def test_a_new_database_has_large_pages_and_an_old_one_keeps_its_own(tmp_path: Path) -> None:
    # a 270 KB queue payload is 17 pages of 16 KiB instead of 68 of 4 KiB
    import sqlite3

    from sqlalchemy import text

    from mailhub.store.db import PAGE_SIZE

    def page_size(path: Path) -> int:
        engine = make_engine(f"sqlite:///{path}")
        try:
            migrate(engine)
            with engine.connect() as conn:
                return int(conn.execute(text("PRAGMA page_size")).scalar_one())
        finally:
            engine.dispose()

    assert PAGE_SIZE == 16384 and page_size(tmp_path / "new.sqlite") == PAGE_SIZE
    old = tmp_path / "old.sqlite"  # made by an earlier release: 4 KiB pages, already WAL
    with sqlite3.connect(old) as conn:
        conn.execute("PRAGMA page_size=4096")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE keep (id INTEGER PRIMARY KEY)")
    assert page_size(old) == 4096  # opened, migrated and used as it is


def test_payload_locations_upgrade_and_a_downgrade_refuses_to_lose_file_payloads(
        tmp_path: Path) -> None:
    """0004 adds where a payload lies; going back while a row's bytes lie in a file would
    leave that row with none, so the downgrade refuses until no row names a file."""
    import pytest
    from alembic import command
    from sqlalchemy import inspect, text

    from mailhub.store.db import _alembic_config

    engine = make_engine(f"sqlite:///{tmp_path / 'hub.sqlite'}")
    try:
        command.upgrade(_alembic_config(engine), "0003")
        with engine.begin() as conn:  # a payload written before the upgrade stays in its row
            conn.execute(text("INSERT INTO payloads (sealed, created_at) "
                              "VALUES (x'0102', '2026-11-23 10:00:00')"))
        migrate(engine)
        cols = {c["name"] for c in inspect(engine).get_columns("payloads")}
        assert {"segment", "seg_offset", "seg_length"} <= cols
        with engine.begin() as conn:
            assert conn.execute(text("SELECT sealed, segment FROM payloads")).one() == (
                b"\x01\x02", None)
            conn.execute(text("INSERT INTO payloads (sealed, created_at, segment, seg_offset, "
                              "seg_length) VALUES (x'', '2026-11-23 10:00:00', 17, 0, 270000)"))
        # one step at a time: on SQLite, DDL is not transactional here, so a refusal in a
        # later step of a multi-step downgrade would leave the earlier steps done
        command.downgrade(_alembic_config(engine), "0004")
        with pytest.raises(RuntimeError, match="deliver or drop them before downgrading"):
            command.downgrade(_alembic_config(engine), "0003")
        assert schema_revision(engine) == "0004"
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM payloads WHERE segment IS NOT NULL"))
        command.downgrade(_alembic_config(engine), "0003")
        assert "segment" not in {c["name"] for c in inspect(engine).get_columns("payloads")}
    finally:
        engine.dispose()


def test_rows_in_flight_before_the_owner_column_are_taken_back_at_start(tmp_path: Path) -> None:
    """0005 adds who claimed a row being sent; a row claimed before it has no owner, and is
    taken back at start as before (no live instance can be known to hold it)."""
    from alembic import command
    from sqlalchemy import text

    from mailhub.deliver import queue
    from mailhub.store.db import _alembic_config

    engine = make_engine(f"sqlite:///{tmp_path / 'hub.sqlite'}")
    try:
        command.upgrade(_alembic_config(engine), "0004")
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO outbound (source_id, message_id, sender, recipient, status, reason, "
                "method, relay, kind, require_tls, attempts, next_attempt_at, sending_since, "
                "created_at, updated_at, trace) VALUES ('s1', '<m@x>', 'a@x', 'b@y', 'queued', "
                "'', 'openpgp', 'smarthost', 'mail', 0, 1, '2026-11-23 10:00:00', "
                "'2026-11-23 10:00:00', '2026-11-23 10:00:00', '2026-11-23 10:00:00', '')"))
        migrate(engine)
        assert schema_revision(engine) == "0005"
        back = queue.recover_inflight(engine, host="elsewhere", alive=lambda pid: True)
        assert [(r.source_id, r.sending_since, r.claimed_by) for r in back] == [("s1", None, "")]
    finally:
        engine.dispose()
