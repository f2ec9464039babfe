"""Vet an organisation's secret key before it becomes one of the hub's own keys.

The hub signs and decrypts unattended, in worker processes with no one to type a passphrase:
its own keys have none (keys/ is readable by the hub's user alone). A passphrase-protected key
imported as it is would become the newest own key, so it would sign every outbound message, and
every signature would fail: all case mail held. So the key is tried first, in a throwaway
keyring, exactly as the hub will use it: a signature, and a decryption with its encryption
subkey.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from mailhub.crypto.openpgp_ops import GpgRun, kill_agent, run_gpg
from mailhub.errors import KeyImportError

# statuses gpg gives when a secret key wants a passphrase it did not get
_LOCKED = ("BAD_PASSPHRASE", "MISSING_PASSPHRASE", "PINENTRY_LAUNCHED")
# libgpg-error codes (the low 16 bits of a FAILURE or ERROR status): bad, or no passphrase
_PASSPHRASE_ERRORS = {11, 177}


def _locked(run: GpgRun) -> bool:
    if run.rc == 0:
        return False
    if any(run.has(s) for s in _LOCKED):
        return True
    for line in run.status:
        if line[0] in ("FAILURE", "ERROR") and len(line) > 2 and line[-1].isdigit():
            if int(line[-1]) & 0xFFFF in _PASSPHRASE_ERRORS:
                return True
    return False


def locked_keys(data: bytes, fingerprints: list[tuple[str, bool]]) -> list[str]:
    """Fingerprints of the keys in ``data`` that cannot sign or decrypt without a passphrase.

    ``fingerprints``: (fingerprint, has an encryption key) for each key with a secret part."""
    home = Path(tempfile.mkdtemp(prefix="mhk", dir="/tmp"))  # short: gpg-agent's socket path
    try:
        home.chmod(0o700)
        imported = run_gpg(str(home), ["--import"], data)
        if imported.rc != 0 and not imported.has("IMPORT_OK"):
            raise KeyImportError(f"gpg could not read this key: {imported.reason()}")
        locked = []
        for fpr, encrypts in fingerprints:
            # an empty passphrase: a key without one ignores it, a protected key refuses it
            signed = run_gpg(str(home), ["--local-user", fpr, "--detach-sign"], b"check",
                             passphrase="")
            if _locked(signed):
                locked.append(fpr)
                continue
            if encrypts:
                sealed = run_gpg(str(home), ["--trust-model", "always", "--encrypt",
                                             "--recipient", fpr], b"check")
                opened = run_gpg(str(home), ["--decrypt"], sealed.stdout, passphrase="")
                if sealed.rc == 0 and _locked(opened):
                    locked.append(fpr)
        return locked
    finally:
        kill_agent(str(home))  # the throwaway keyring's gpg-agent goes with it
        shutil.rmtree(home, ignore_errors=True)
