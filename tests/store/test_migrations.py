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
        assert schema_revision(engine) == "0002"
    finally:
        engine.dispose()


def test_upgrade_from_the_first_revision_adds_the_sweep_index(tmp_path: Path) -> None:
    from alembic import command
    from sqlalchemy import inspect

    from mailhub.store.db import _alembic_config

    engine = make_engine(f"sqlite:///{tmp_path / 'hub.sqlite'}")
    try:
        command.upgrade(_alembic_config(engine), "0001")
        assert "ix_outbound_finished" not in {i["name"] for i in inspect(engine).get_indexes("outbound")}
        migrate(engine)
        assert "ix_outbound_finished" in {i["name"] for i in inspect(engine).get_indexes("outbound")}
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
