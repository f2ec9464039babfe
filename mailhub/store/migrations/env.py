"""Alembic environment: the engine comes from mailhub (no alembic.ini, no URL in a file)."""

from alembic import context
from sqlmodel import SQLModel

import mailhub.store.schema  # noqa: F401  (registers every table on SQLModel.metadata)

engine = context.config.attributes["engine"]
with engine.begin() as connection:
    context.configure(connection=connection, target_metadata=SQLModel.metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()
