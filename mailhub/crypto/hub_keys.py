"""The hub's own keys under keys_dir: OpenPGP (in the gpg keyring), S/MIME, TLS, at-rest.

Several own keys may coexist during a rollover: all of them decrypt, the newest signs. Private
files are created 0600 and never replaced silently (``write_secret``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from mailhub.crypto.certs import Identity, load_identity, write_secret
from mailhub.crypto.openpgp import KeyInfo, Keyring
from mailhub.crypto.selfsigned import generate_smime_identity, generate_tls_identity
from mailhub.errors import ConfigError

log = logging.getLogger("mailhub.crypto")


@dataclass(frozen=True)
class SmimeMaterial:
    """PEM bytes of one own S/MIME identity, cheap to hand to a worker process."""

    key_pem: bytes
    cert_pem: bytes


class HubKeys:
    """Access to the hub's own key material in keys_dir."""

    def __init__(self, keys_dir: Path, *, allow_keyserver: bool = False, keyserver: str = "") -> None:
        self.keys_dir = Path(keys_dir)
        self.allow_keyserver = allow_keyserver
        self.keyserver = keyserver

    @property
    def gnupg_home(self) -> Path:
        return self.keys_dir / "gnupg"

    @property
    def smime_dir(self) -> Path:
        return self.keys_dir / "smime"

    @property
    def tls_key(self) -> Path:
        return self.keys_dir / "tls.key"

    @property
    def tls_cert(self) -> Path:
        return self.keys_dir / "tls.crt"

    @property
    def atrest_key(self) -> Path:
        return self.keys_dir / "atrest.key"

    @cached_property
    def keyring(self) -> Keyring:
        return Keyring(self.gnupg_home, allow_keyserver=self.allow_keyserver,
                       keyserver=self.keyserver)

    # -- OpenPGP -------------------------------------------------------------------------

    def openpgp_own(self) -> list[KeyInfo]:
        """Own secret keys, newest first (the first one signs). Creation times have whole
        seconds: of two keys made in the same second, the one the keyring got last (the one
        ``keys import-own`` just added) counts as newer."""
        keys = [k for k in self.keyring.list_keys(secret=True) if not k.revoked and not k.expired]
        order = sorted(enumerate(keys), key=lambda ik: (ik[1].created, ik[0]), reverse=True)
        return [k for _, k in order]

    def openpgp_signer(self) -> KeyInfo:
        own = self.openpgp_own()
        if not own:
            raise ConfigError(f"the hub has no usable OpenPGP key in {self.gnupg_home}",
                              hint="run 'mailhub init' or 'mailhub keys import-own FILE'")
        return own[0]

    # -- S/MIME --------------------------------------------------------------------------

    def smime_files(self) -> list[Path]:
        return sorted(self.smime_dir.glob("own-*.pem")) if self.smime_dir.exists() else []

    def smime_identities(self) -> list[Identity]:
        """Own S/MIME identities, newest certificate first (the first one signs)."""
        ids = []
        for path in self.smime_files():
            data = path.read_bytes()
            ids.append(load_identity(data, data))
        return sorted(ids, key=lambda i: i.cert.not_valid_before_utc, reverse=True)

    def smime_signer(self) -> Identity:
        ids = self.smime_identities()
        if not ids:
            raise ConfigError(f"the hub has no S/MIME identity in {self.smime_dir}",
                              hint="run 'mailhub init' or 'mailhub keys import-own FILE'")
        return ids[0]

    def add_smime_identity(self, identity: Identity) -> Path:
        path = self.smime_dir / f"own-{identity.fingerprint[:16]}.pem"
        write_secret(path, identity.key_pem() + identity.cert_pem())
        return path

    # -- generation (init) ---------------------------------------------------------------

    def generate_all(self, domain: str, display_name: str) -> dict[str, str]:
        """Create every missing piece of own key material; returns what was made."""
        made: dict[str, str] = {}
        self.keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        address = f"hub@{domain}"
        if not self.openpgp_own():
            info = self.keyring.generate_key(f"{display_name} <{address}>")
            made["openpgp"] = info.fingerprint
        if not self.smime_files():
            key_pem, cert_pem = generate_smime_identity(address, display_name)
            made["smime"] = str(self.add_smime_identity(load_identity(key_pem, cert_pem)))
        if self.tls_cert.exists() != self.tls_key.exists():  # half a pair: serve could not start
            have, lost = ((self.tls_cert, self.tls_key) if self.tls_cert.exists()
                          else (self.tls_key, self.tls_cert))
            raise ConfigError(f"{lost} is missing but {have} exists; init will not pair a new "
                                 "file with the old one",
                                 hint=f"restore {lost.name} from your backup, or move {have.name} "
                                      "away to have init make a new TLS certificate and key")
        if not self.tls_cert.exists():
            key_pem, cert_pem = generate_tls_identity(["localhost", f"mail.{domain}", domain])
            write_secret(self.tls_key, key_pem)
            self.tls_cert.write_bytes(cert_pem)
            made["tls"] = str(self.tls_cert)
        if not self.atrest_key.exists():
            from mailhub.crypto.atrest import generate_atrest_key

            generate_atrest_key(self.atrest_key)
            made["atrest"] = str(self.atrest_key)
        return made
