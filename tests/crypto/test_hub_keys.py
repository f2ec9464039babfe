"""Which of the hub's own OpenPGP keys signs: the newest, and on a tie the one added last."""

from __future__ import annotations

import os
from pathlib import Path

from mailhub.crypto.hub_keys import HubKeys
from mailhub.crypto.openpgp_ops import kill_agent
from tests.crypto.pgp_fixtures import cli_primary_fpr, gpg_cli


def _make(home: str, uid: str, when: str) -> str:
    """An own key made as if at ``when`` (gpg's clock is faked, so creation times can tie)."""
    gpg_cli(home, "--faked-system-time", when, "--quick-gen-key", uid, "ed25519", "sign", "2y")
    return cli_primary_fpr(home, uid)


def test_the_newest_own_key_signs_and_a_tie_goes_to_the_key_added_last(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    home = keys_dir / "gnupg"
    home.mkdir(parents=True, mode=0o700)
    os.chmod(home, 0o700)
    try:
        first = _make(str(home), "hub <hub@one.example>", "20260101T000000!")
        second = _make(str(home), "org <hub@two.example>", "20260101T000000!")  # same second
        older = _make(str(home), "old <hub@three.example>", "20250101T000000!")  # added last
        own = [k.fingerprint for k in HubKeys(keys_dir).openpgp_own()]
        assert own == [second, first, older]
        assert HubKeys(keys_dir).openpgp_signer().fingerprint == second
    finally:
        kill_agent(str(home))
