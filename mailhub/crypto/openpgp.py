"""OpenPGP through the real gpg: the hub's keyring (``Keyring``) and the per-message operations.

Key management goes through python-gnupg, wrapped so that a failed gpg result raises
(``CryptoError``, ``KeyImportError``) instead of coming back as a falsy object nobody checks.
The per-message operations (``sign_encrypt``, ``decrypt``, ...) are module functions from
:mod:`mailhub.crypto.openpgp_ops`, re-exported here: they take a GNUPGHOME path and bytes, run
exactly one gpg process, and are picklable for the relay's process pool.

Network: gpg never looks up keys by itself. ``Keyring`` writes gpg.conf with no keyserver,
``no-auto-key-retrieve`` and ``auto-key-locate local`` (gpg 2.2's default would query WKD for an
address it has no key for), and dirmngr.conf with HTTP and LDAP disabled, unless a keyserver is
explicitly allowed.

Trust: the keyring keeps gpg's default trust model. Encryption alone passes
``--trust-model always``, because the hub picks recipient keys itself, by fingerprint, from its
own registry (imported by an administrator or learnt under the Autocrypt rules); gpg's web of
trust would only make it refuse keys the registry already vouched for. Nothing else relies on gpg
trust: "verified" means a good signature by a non-revoked, non-expired key in the keyring.
"""

from __future__ import annotations

import logging
import os
import re
from email.utils import parseaddr
from pathlib import Path

import gnupg

from mailhub.crypto.key_listing import MIN_BITS, KeyInfo, parse_key_listing
from mailhub.crypto.openpgp_ops import (
    BASE_ARGS,
    DecryptOutcome,
    DetachedSignature,
    KeyUnusable,
    VerifyOutcome,
    decrypt,
    detached_signature,
    kill_agent,
    norm_fpr,
    run_gpg,
    sign_detached,
    sign_encrypt,
    verify_detached,
)
from mailhub.crypto.own_key_check import locked_keys
from mailhub.errors import CryptoError, KeyImportError, NotFound

__all__ = [
    "DecryptOutcome", "DetachedSignature", "KeyInfo", "KeyNotFound", "KeyUnusable", "Keyring",
    "VerifyOutcome", "decrypt", "detached_signature", "kill_agent", "norm_fpr",
    "parse_key_listing", "sign_detached", "sign_encrypt", "verify_detached",
]

log = logging.getLogger("mailhub.crypto")
# python-gnupg logs key material (and decrypted chunks) at DEBUG; never let that through.
logging.getLogger("gnupg").setLevel(logging.WARNING)

GPG_CONF = """\
# Written by mailhub; rewritten at start. gpg must never touch the network by itself.
no-auto-key-retrieve
auto-key-locate local
keyserver-options no-auto-key-retrieve
no-random-seed-file
no-greeting
no-emit-version
keyid-format long
with-fingerprint
personal-cipher-preferences AES256 AES192 AES
personal-digest-preferences SHA512 SHA384 SHA256
cert-digest-algo SHA512
"""
AGENT_CONF = "# Written by mailhub.\nallow-loopback-pinentry\ndisable-scdaemon\n"
DIRMNGR_OFF = "# Written by mailhub: no keyserver, no WKD.\ndisable-http\ndisable-ldap\n"


class KeyNotFound(CryptoError, NotFound):
    """The fingerprint names no key in the hub's keyring."""


def _write_if_changed(path: Path, text: str) -> None:
    """Atomic replace, and only when different: gpg processes may be reading it right now."""
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_config(home: Path, *, allow_keyserver: bool = False, keyserver: str = "") -> None:
    """gpg.conf, gpg-agent.conf and dirmngr.conf that keep gpg off the network."""
    _write_if_changed(home / "gpg.conf", GPG_CONF)
    _write_if_changed(home / "gpg-agent.conf", AGENT_CONF)
    if allow_keyserver:
        line = f"keyserver {keyserver}\n" if keyserver else ""
        _write_if_changed(home / "dirmngr.conf",
                          "# Written by mailhub: keyserver allowed.\n" + line)
    else:
        _write_if_changed(home / "dirmngr.conf", DIRMNGR_OFF)


class Keyring:
    """The hub's gpg keyring: own secret keys and the partners' and patients' public keys."""

    def __init__(self, gnupghome: Path, *, allow_keyserver: bool = False,
                 keyserver: str = "") -> None:
        self.home = Path(gnupghome)
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)
        write_config(self.home, allow_keyserver=allow_keyserver, keyserver=keyserver)
        self._gpg = gnupg.GPG(gnupghome=str(self.home), options=list(BASE_ARGS))

    @property
    def gnupghome(self) -> str:
        """The path as a string, for the worker-process functions."""
        return str(self.home)

    # -- listing -------------------------------------------------------------------------

    def _listing(self, args: list[str]) -> list[KeyInfo] | None:
        run = run_gpg(self.gnupghome, ["--with-colons", "--fixed-list-mode", *args], b"")
        if run.rc != 0:
            if any(s[0] == "ERROR" for s in run.status) or b"No public key" in run.stderr \
                    or b"No secret key" in run.stderr:
                return None
            raise CryptoError(f"gpg could not list keys: {run.reason()}")
        return parse_key_listing(run.stdout.decode("utf-8", "surrogateescape"))

    def list_keys(self, secret: bool = False) -> list[KeyInfo]:
        """All keys (``secret=True``: only those with a secret part, i.e. the hub's own)."""
        args = ["--list-secret-keys"] if secret else ["--list-keys", "--with-secret"]
        return self._listing(args) or []

    def get(self, fpr: str) -> KeyInfo | None:
        """The key with this primary fingerprint, or None."""
        fpr = norm_fpr(fpr)
        found = self._listing(["--list-keys", "--with-secret", fpr]) or []
        return next((k for k in found if k.fingerprint == fpr), None)

    def find_for_address(self, addr: str) -> list[KeyInfo]:
        """Keys with a valid user ID for this email address (compared case-insensitively)."""
        addr = addr.strip().strip("<>").lower()
        if "@" not in addr:
            return []
        found = self._listing(["--list-keys", "--with-secret", f"<{addr}>"]) or []
        return [k for k in found if addr in k.addresses]

    def show(self, data: bytes) -> tuple[list[KeyInfo], bool, str]:
        """What a key file holds, without importing it: (keys, has_secret_material, gpg reason)."""
        run = run_gpg(self.gnupghome, ["--with-colons", "--show-keys"], data)
        text = run.stdout.decode("utf-8", "surrogateescape")
        has_secret = any(line.startswith(("sec:", "ssb:")) for line in text.splitlines())
        return parse_key_listing(text), has_secret, run.reason()

    # -- import --------------------------------------------------------------------------

    def _scan(self, data: bytes) -> tuple[list[KeyInfo], bool]:
        if not data or not data.strip():
            raise KeyImportError("the key file is empty")
        if b"-----BEGIN PGP " in data:
            m = re.search(rb"-----BEGIN PGP ([A-Z ]+)-----", data)
            kind = m.group(1) if m else b""
            if not re.search(rb"-----END PGP " + re.escape(kind) + rb"-----", data):
                raise KeyImportError("the armored key is truncated (no END line)",
                                     hint="ask for the complete key file")
        keys, has_secret, reason = self.show(data)
        if not keys:
            raise KeyImportError(f"no OpenPGP key found in the file ({reason})",
                                 hint="expected an armored public key "
                                      "('-----BEGIN PGP PUBLIC KEY BLOCK-----')")
        return keys, has_secret

    def import_public(self, data: bytes, *, expected_address: str | None = None) -> list[KeyInfo]:
        """Import a partner's or patient's public key; refuse anything the hub must not use.

        A key the keyring already holds is imported even when it is now revoked or unusable:
        that is how a revocation reaches the hub (the caller marks its records)."""
        if b"PRIVATE KEY BLOCK" in data:
            raise KeyImportError("this file holds a secret key: never import a partner's secret "
                                 "key", hint="ask the partner for their public key only")
        keys, has_secret = self._scan(data)
        if has_secret:
            raise KeyImportError("this file holds secret key material: never import a partner's "
                                 "secret key", hint="ask the partner for their public key only")
        for k in keys:
            problem = ("it is revoked" if k.revoked else
                       f"it expired on {k.expires:%Y-%m-%d}" if k.expired and k.expires else
                       "it is expired" if k.expired else
                       "it has no valid encryption subkey" if not k.can_encrypt else
                       "it names no email address" if not k.addresses else
                       f"its encryption key is too short ({k.weak_encryption}; at least "
                       f"{MIN_BITS} bits)" if k.weak_encryption else "")
            if problem and self.get(k.fingerprint) is not None:
                continue  # an update (revocation) of a key in use: take it in
            if problem:
                raise KeyImportError(f"key {k.fingerprint} refused: {problem}",
                                     hint="ask the key's owner for a current key")
            if expected_address and expected_address.strip().lower() not in k.addresses:
                raise KeyImportError(
                    f"key {k.fingerprint} has no user ID for {expected_address} "
                    f"(it has: {', '.join(k.addresses) or 'no email address'})")
        self._import(data)
        return [self.get(k.fingerprint) or k for k in keys]

    def import_secret(self, data: bytes, *, unattended: bool = True) -> list[KeyInfo]:
        """Import one of the hub's own secret keys (rollover); expired ones still decrypt.

        ``unattended`` (the hub's own keys): a key that needs a passphrase is refused. Only a
        caller that hands gpg the passphrase on every use may pass False."""
        keys, has_secret = self._scan(data)
        if not has_secret:
            raise KeyImportError("no secret key in this file",
                                 hint="partners' public keys go in with 'mailhub keys import'")
        locked = (locked_keys(data, [(k.fingerprint, k.can_encrypt) for k in keys])
                  if unattended else [])
        if locked:
            raise KeyImportError(
                f"the secret key {locked[0]} is protected by a passphrase; the hub signs and "
                "decrypts unattended, so its own keys have none (keys/ is readable by the hub "
                "alone)",
                hint=f"remove the passphrase in a copy of the keyring ('gpg --passwd {locked[0]}',"
                     " leaving the new one empty), export it ('gpg --armor --export-secret-keys "
                     f"{locked[0]} > key.asc') and import that file")
        result = self._import(data)
        if not (result.sec_imported or result.sec_dups):
            raise KeyImportError("gpg imported no secret key from this file")
        own = {k.fingerprint: k for k in self.list_keys(secret=True)}
        return [own[k.fingerprint] for k in keys if k.fingerprint in own]

    def _import(self, data: bytes) -> gnupg.ImportResult:
        result = self._gpg.import_keys(data)
        if not result.fingerprints or result.not_imported:
            problems = "; ".join(r.get("text", "").strip() for r in result.results if "problem" in r)
            raise KeyImportError(f"gpg refused the key: {problems or _last_line(result.stderr)}")
        return result

    # -- generation, export, deletion ----------------------------------------------------

    def generate_key(self, uid: str, expire: str = "3y") -> KeyInfo:
        """A new own key: ed25519 signing primary and cv25519 encryption subkey, no passphrase."""
        name, email = parseaddr(uid)
        if not name and not email:
            raise CryptoError(f"not a user ID: {uid!r}", hint="use 'Name <address>'")
        lines = ["Key-Type: eddsa", "Key-Curve: ed25519", "Key-Usage: sign",
                 "Subkey-Type: ecdh", "Subkey-Curve: cv25519", "Subkey-Usage: encrypt"]
        if name:
            lines.append(f"Name-Real: {name}")
        if email:
            lines.append(f"Name-Email: {email}")
        lines += [f"Expire-Date: {expire}", "%no-protection", "%commit", ""]
        result = self._gpg.gen_key("\n".join(lines))
        if not result.fingerprint:
            raise CryptoError(f"gpg could not generate a key: {_last_line(result.stderr)}")
        info = self.get(result.fingerprint)
        if info is None:
            raise CryptoError(f"gpg generated {result.fingerprint} but does not list it")
        log.info("generated OpenPGP key %s", info.fingerprint)
        return info

    def export_public(self, fpr: str) -> str:
        """The armored public key."""
        fpr = norm_fpr(fpr)
        armored = self._gpg.export_keys(fpr, armor=True)
        if not armored or "BEGIN PGP PUBLIC KEY BLOCK" not in armored:
            raise KeyNotFound(f"no OpenPGP key {fpr} in the hub keyring")
        return armored

    def export_public_binary(self, fpr: str, *, minimal: bool = True) -> bytes:
        """The binary public key (minimal: for an Autocrypt header)."""
        fpr = norm_fpr(fpr)
        data = self._gpg.export_keys(fpr, armor=False, minimal=minimal)
        if not data:
            raise KeyNotFound(f"no OpenPGP key {fpr} in the hub keyring")
        return data if isinstance(data, bytes) else data.encode("latin-1")

    def delete(self, fpr: str) -> None:
        """Remove a key (and its secret part, if any) from the keyring."""
        info = self.get(fpr)
        if info is None:
            raise KeyNotFound(f"no OpenPGP key {norm_fpr(fpr)} in the hub keyring")
        if info.secret:
            res = self._gpg.delete_keys(info.fingerprint, secret=True, expect_passphrase=False)
            if str(res.status) != "ok":
                raise CryptoError(f"gpg could not delete the secret key {info.fingerprint}: "
                                  f"{res.status}")
        res = self._gpg.delete_keys(info.fingerprint)
        if str(res.status) != "ok":
            raise CryptoError(f"gpg could not delete key {info.fingerprint}: {res.status}")


def _last_line(stderr: str) -> str:
    lines = [ln for ln in (stderr or "").splitlines() if ln and not ln.startswith("[GNUPG:]")]
    return lines[-1].removeprefix("gpg: ") if lines else "no reason given"
