"""The hub's parts, built once from a Config and handed down (no global singletons).

``Hub`` builds each part lazily, so a CLI command that only lists the queue does not start gpg,
and ``serve`` builds them all.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path

from sqlalchemy.engine import Engine

from mailhub.config import Config
from mailhub.errors import ConfigError

log = logging.getLogger("mailhub")


class Hub:
    def __init__(self, config: Config) -> None:
        self.config = config

    @property
    def domain(self) -> str:
        return self.config.hub.domain

    @cached_property
    def engine(self) -> Engine:
        from mailhub.store.db import make_engine

        if not self.config.hub.database_url:
            self.config.hub.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return make_engine(self.config.hub.db_url)

    def migrate(self) -> None:
        from mailhub.store.db import migrate

        migrate(self.engine)

    @cached_property
    def keys(self):  # type: ignore[no-untyped-def]
        from mailhub.crypto.hub_keys import HubKeys

        return HubKeys(self.config.hub.keys_dir, allow_keyserver=self.config.crypto.allow_keyserver,
                       keyserver=self.config.crypto.keyserver)

    @cached_property
    def sealer(self):  # type: ignore[no-untyped-def]
        from mailhub.crypto.atrest import AtRest

        path = self.keys.atrest_key
        if not Path(path).exists():  # init makes it first: without it there is no instance
            raise ConfigError(
                f"{self.config.path} belongs to no initialised instance: {path} is missing",
                hint=f"run 'mailhub init {self.config.path.parent}' to make one there, or "
                     "point --config at the config.toml of the instance you mean")
        return AtRest.load(path)

    @cached_property
    def payload_files(self):  # type: ignore[no-untyped-def]
        """Large queue payloads' segment files with SQLite; None with PostgreSQL, where every
        payload stays in its row for whichever instance sends it."""
        from mailhub.deliver.payload_files import PayloadFiles

        if not self.config.hub.db_url.startswith("sqlite"):
            return None
        return PayloadFiles(self.config.hub.data_dir / "payloads")

    @cached_property
    def spool(self):  # type: ignore[no-untyped-def]
        from mailhub.spool.spool import Spool

        return Spool(self.config.spool_dir, self.sealer)

    @cached_property
    def policy_cache(self):  # type: ignore[no-untyped-def]
        from mailhub.policy.rules import PolicyCache

        return PolicyCache(self.config.hub.rules_dir, check_every=1.0)

    @cached_property
    def key_snapshot(self):  # type: ignore[no-untyped-def]
        from mailhub.crypto.registry import KeySnapshot

        return KeySnapshot(self.engine)

    def hub_fingerprint(self) -> str:
        return self.keys.openpgp_signer().fingerprint
