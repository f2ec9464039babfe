"""Imports every module that defines tables, so SQLModel.metadata holds the whole schema."""

from mailhub.store import audit, models  # noqa: F401
