"""The per-message gpg operations: one gpg process each, plain bytes in, plain data out.

They are module functions taking the GNUPGHOME as a string, so the relay's process-pool workers
can run them. gpg is called directly here, not through python-gnupg, which costs an extra
``gpg --version`` run and reader threads per call: the relay's hot path is one gpg process per
message. Every failure raises (``CryptoError``, ``DecryptionFailed``); nothing returns a result
that has to be checked.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import NamedTuple

from mailhub.crypto import gpg_process
from mailhub.errors import CryptoError, DecryptionFailed

log = logging.getLogger("mailhub.crypto")

GPG_BINARY = "gpg"
# --no-random-seed-file: concurrent gpg processes otherwise queue on the seed file's lock.
BASE_ARGS = ("--batch", "--no-tty", "--no-random-seed-file", "--no-auto-key-retrieve",
             "--no-auto-key-locate", "--pinentry-mode", "loopback")
TIMEOUT = 300.0
# The plaintext one inbound message may open to, all its OpenPGP parts together: a compressed
# message ("decompression bomb") that would grow past it is refused, not cut short.
MAX_OUTPUT = 64 * 1024 * 1024
_CUT_SLACK = 1024 * 1024  # gpg stops at --max-output a chunk early: this much over, never under
SIGNATURE_STATUSES = ("verified", "invalid", "unknown-key", "none")
_HASHES = {"1": "md5", "2": "sha1", "3": "ripemd160", "8": "sha256", "9": "sha384",
           "10": "sha512", "11": "sha224"}
_INVALID_KEY = {"0": "no specific reason", "1": "no such key in the hub keyring",
                "2": "ambiguous key specification", "3": "the key cannot be used for this",
                "4": "the key is revoked", "5": "the key is expired", "8": "policy mismatch",
                "9": "not a secret key", "10": "the key is not trusted",
                "13": "the key is disabled", "14": "bad key specification"}
_FPR_RE = re.compile(r"^(?:[0-9A-F]{40}|[0-9A-F]{64})$")


class KeyUnusable(CryptoError):
    """gpg refused a recipient or signer key (not found, expired, revoked, wrong usage)."""

    def __init__(self, fingerprint: str, reason: str, *, role: str = "recipient") -> None:
        super().__init__(f"the {role} key {fingerprint} cannot be used: {reason}")
        self.fingerprint = fingerprint
        self.reason = reason
        self.role = role


class DecryptOutcome(NamedTuple):
    """What ``decrypt`` found: the plaintext and who signed it.

    ``signer`` is the signing key's PRIMARY fingerprint (40 hex) when the key is in the keyring;
    ``issuer`` is whatever the signature names (key ID or fingerprint), also for unknown keys.
    ``encrypted`` is False for input that was only signed (clearsigned or a signed literal).
    """

    plaintext: bytes
    signature: str
    signer: str | None
    encrypted: bool = True
    issuer: str | None = None


class VerifyOutcome(NamedTuple):
    status: str
    signer: str | None


class DetachedSignature(NamedTuple):
    armored: bytes
    micalg: str  # RFC 3156 name, e.g. "pgp-sha256"


@dataclass(frozen=True)
class GpgRun:
    rc: int
    stdout: bytes
    stderr: bytes
    status: list[list[str]]

    def has(self, keyword: str) -> bool:
        return any(s[0] == keyword for s in self.status)

    def reason(self) -> str:
        """gpg's last human-readable complaint (no data, only gpg's own words)."""
        lines = [ln for ln in self.stderr.decode("utf-8", "replace").splitlines()
                 if ln.startswith("gpg: ") and not ln.startswith("gpg: WARNING")]
        return lines[-1][5:] if lines else f"gpg exited with status {self.rc}"


def norm_fpr(value: str) -> str:
    """A full fingerprint in upper-case hex; anything vaguer is refused (keys are chosen by us)."""
    fpr = value.replace(" ", "").upper().removeprefix("0X")
    if not _FPR_RE.match(fpr):
        raise CryptoError(f"not a full OpenPGP fingerprint: {value!r}",
                          hint="keys are named by their 40-hex-digit fingerprint")
    return fpr


def run_gpg(gnupghome: str, args: list[str], data: bytes, *, passphrase: str | None = None,
            timeout: float = TIMEOUT, expect_output: int | None = None) -> GpgRun:
    """One gpg process; status lines on stderr, the passphrase (if any) on its own pipe.

    ``expect_output``: an upper bound on gpg's output when one is known (encryption), which
    lets the runner wait for gpg's exit instead of waking for every piece of output."""
    cmd = [GPG_BINARY, "--homedir", gnupghome, *BASE_ARGS, "--status-fd", "2"]
    pass_fds: tuple[int, ...] = ()
    read_fd = None
    if passphrase is not None:
        read_fd, write_fd = os.pipe()
        os.write(write_fd, passphrase.encode("utf-8") + b"\n")
        os.close(write_fd)
        pass_fds = (read_fd,)
        cmd += ["--passphrase-fd", str(read_fd)]
    try:
        proc = gpg_process.run([*cmd, *args], data, timeout=timeout, pass_fds=pass_fds,
                               expect_output=expect_output)
    except FileNotFoundError as exc:
        raise CryptoError("gpg is not installed", hint="install GnuPG 2.2 or later") from exc
    except gpg_process.TimedOut as exc:
        raise CryptoError(f"gpg did not finish within {timeout:.0f} s") from exc
    finally:
        if read_fd is not None:
            os.close(read_fd)
    status = [line[9:].decode("utf-8", "replace").split(" ")
              for line in proc.stderr.splitlines() if line.startswith(b"[GNUPG:] ")]
    return GpgRun(proc.returncode, proc.stdout, proc.stderr, status)


def armored_bound(size: int) -> int:
    """More than gpg's armored output for ``size`` bytes of input can be (no compression):
    the packets add at most a few KiB (keys, signature), armor adds a third and line ends."""
    return (size + 65536) * 3 // 2


def _key_problem(run: GpgRun) -> KeyUnusable | None:
    for s in run.status:
        if s[0] in ("INV_RECP", "INV_SGNR") and len(s) > 1:
            who = s[2] if len(s) > 2 else "?"
            reason = _INVALID_KEY.get(s[1], f"code {s[1]}")
            skipped = re.search(rb"skipped: ([^\n]+)", run.stderr)
            if s[1] == "0" and skipped:  # e.g. "Unusable public key" (revoked or expired)
                reason = skipped.group(1).decode("utf-8", "replace").strip().lower()
            return KeyUnusable(who, reason,
                               role="recipient" if s[0] == "INV_RECP" else "signing")
    return None


def sign_encrypt(gnupghome: str, data: bytes, recipients: list[str], signer: str | None, *,
                 passphrase: str | None = None) -> bytes:
    """Sign and encrypt in one pass (ASCII-armored); ``signer=None`` only encrypts."""
    fprs = [norm_fpr(r) for r in recipients]
    if not fprs:
        raise CryptoError("no recipient key to encrypt to")
    # --trust-model always: the recipients are fingerprints the hub's registry chose.
    args = ["--trust-model", "always", "--compress-algo", "none", "--armor", "--encrypt"]
    if signer:
        args += ["--sign", "--local-user", norm_fpr(signer)]
    for fpr in fprs:
        args += ["--recipient", fpr]
    run = run_gpg(gnupghome, args, data, passphrase=passphrase,
                  expect_output=armored_bound(len(data)))
    if run.rc != 0 or not run.has("END_ENCRYPTION") or not run.stdout:
        raise _key_problem(run) or CryptoError(f"gpg could not encrypt: {run.reason()}")
    return run.stdout


def detached_signature(gnupghome: str, data: bytes, signer: str, *,
                       passphrase: str | None = None) -> DetachedSignature:
    """An armored detached signature over ``data`` and its RFC 3156 micalg."""
    args = ["--armor", "--detach-sign", "--digest-algo", "SHA256", "--local-user",
            norm_fpr(signer)]
    run = run_gpg(gnupghome, args, data, passphrase=passphrase, expect_output=65536)
    created = next((s for s in run.status if s[0] == "SIG_CREATED"), None)
    if run.rc != 0 or created is None or not run.stdout:
        raise _key_problem(run) or CryptoError(f"gpg could not sign: {run.reason()}")
    algo = _HASHES.get(created[3] if len(created) > 3 else "", "sha256")
    return DetachedSignature(run.stdout, f"pgp-{algo}")


def sign_detached(gnupghome: str, data: bytes, signer: str, *,
                  passphrase: str | None = None) -> bytes:
    """An armored detached signature over ``data``."""
    return detached_signature(gnupghome, data, signer, passphrase=passphrase).armored


class _Sig(NamedTuple):
    status: str
    signer: str | None
    issuer: str | None


def parse_signatures(status: list[list[str]]) -> list[_Sig]:
    """One entry per signature in gpg's status lines (pure; see gpg's doc/DETAILS)."""
    sigs: list[_Sig] = []
    cur: dict[str, str | None] | None = None
    considered: str | None = None
    for s in status:
        kw = s[0]
        if kw == "NEWSIG":
            if cur and cur["status"]:
                sigs.append(_Sig(cur["status"], cur["signer"], cur["issuer"]))
            cur, considered = {"status": None, "signer": None, "issuer": None}, None
            continue
        if kw == "KEY_CONSIDERED" and len(s) > 1:
            considered = s[1]
            continue
        if kw not in ("GOODSIG", "EXPSIG", "EXPKEYSIG", "REVKEYSIG", "BADSIG", "ERRSIG",
                      "VALIDSIG"):
            continue
        if cur is None or (kw != "VALIDSIG" and cur["status"]):
            if cur and cur["status"]:
                sigs.append(_Sig(cur["status"], cur["signer"], cur["issuer"]))
            cur = {"status": None, "signer": None, "issuer": None}
        if kw == "VALIDSIG":
            cur["signer"] = s[10] if len(s) > 10 else (s[1] if len(s) > 1 else None)
            continue
        cur["issuer"] = s[1] if len(s) > 1 else None
        if kw == "GOODSIG":
            cur["status"], cur["signer"] = "verified", considered
        elif kw == "ERRSIG":
            missing_key = len(s) > 6 and s[6] == "9"
            cur["status"] = "unknown-key" if missing_key else "invalid"
            if len(s) > 7 and s[7] not in ("-", ""):
                cur["issuer"] = s[7]
        else:  # a bad signature, or a good one by an expired or revoked key
            cur["status"], cur["signer"] = "invalid", considered
    if cur and cur["status"]:
        sigs.append(_Sig(cur["status"], cur["signer"], cur["issuer"]))
    return sigs


def summarize_signatures(sigs: list[_Sig]) -> _Sig:
    """One verdict: any invalid signature wins, then an unknown key, then verified."""
    for wanted in ("invalid", "unknown-key", "verified"):
        hit = next((s for s in sigs if s.status == wanted), None)
        if hit:
            signer = hit.signer.upper() if hit.signer and wanted != "unknown-key" else None
            return _Sig(wanted, signer, hit.issuer)
    return _Sig("none", None, None)


def _decrypt_failure(run: GpgRun) -> str | None:
    """Why an encrypted message did not decrypt safely, or None when it did."""
    if run.has("NO_SECKEY") and not run.has("DECRYPTION_OKAY"):
        ids = sorted({s[1] for s in run.status if s[0] == "NO_SECKEY" and len(s) > 1})
        return f"it is not encrypted to any of the hub's keys (it is for {', '.join(ids)})"
    if run.has("BADMDC") or run.has("DECRYPTION_FAILED") or not run.has("DECRYPTION_OKAY"):
        return f"the ciphertext is corrupt or was tampered with ({run.reason()})"
    info = next((s for s in run.status if s[0] == "DECRYPTION_INFO"), None)
    mdc = info is not None and len(info) > 1 and info[1] != "0"
    aead = info is not None and len(info) > 3 and info[3] not in ("0", "")
    if not (mdc or aead or run.has("GOODMDC")):
        return "it has no integrity protection (no MDC), so it may have been altered"
    return None


def decrypt(gnupghome: str, data: bytes, *, passphrase: str | None = None,
            max_output: int = MAX_OUTPUT) -> DecryptOutcome:
    """Decrypt (or open a signed-only OpenPGP message) and check its signature.

    Raises ``DecryptionFailed`` with the reason; never returns plaintext from a failed or
    unauthenticated decryption, nor more than ``max_output`` bytes of it.
    """
    if not data.strip():
        raise DecryptionFailed("cannot decrypt: the OpenPGP data is empty")
    # gpg cuts its output at --max-output yet reports a good decryption: ask for a little
    # more than allowed, so that anything cut is longer than the limit and refused here.
    run = run_gpg(gnupghome, ["--max-output", str(max_output + _CUT_SLACK), "--decrypt"], data,
                  passphrase=passphrase)
    if len(run.stdout) > max_output:
        raise DecryptionFailed(
            "cannot decrypt: its plaintext is larger than the hub accepts (a message may open "
            f"to at most {MAX_OUTPUT // (1024 * 1024)} MiB in all; compressed data that grows "
            "past that is refused)",
            hint="send large files another way, or split them over several messages")
    encrypted = any(run.has(k) for k in ("BEGIN_DECRYPTION", "ENC_TO", "NO_SECKEY",
                                         "DECRYPTION_FAILED", "DECRYPTION_OKAY"))
    sig = summarize_signatures(parse_signatures(run.status))
    if encrypted:
        failure = _decrypt_failure(run)
        if failure:
            raise DecryptionFailed(f"cannot decrypt: {failure}")
    elif run.has("NODATA") or (sig.status == "none" and (run.rc != 0 or
                                                         not run.has("PLAINTEXT"))):
        raise DecryptionFailed(f"cannot read the OpenPGP data: {run.reason()}",
                               hint="the armor may be truncated or damaged")
    if any(s[0] == "FAILURE" for s in run.status) and sig.status == "none":
        raise DecryptionFailed(f"cannot decrypt: {run.reason()}")
    return DecryptOutcome(run.stdout, sig.status, sig.signer, encrypted, sig.issuer)


def verify_detached(gnupghome: str, data: bytes, sig: bytes) -> VerifyOutcome:
    """Check a detached signature over ``data``: (status, signer primary fingerprint)."""
    with tempfile.NamedTemporaryFile(prefix="mhsig", suffix=".asc") as fh:
        fh.write(sig)
        fh.flush()
        run = run_gpg(gnupghome, ["--verify", fh.name, "-"], data)
    verdict = summarize_signatures(parse_signatures(run.status))
    if verdict.status == "none":  # garbage where a signature should be
        return VerifyOutcome("invalid", None)
    return VerifyOutcome(verdict.status, verdict.signer)


def kill_agent(gnupghome: str) -> None:
    """Stop the gpg-agent (and dirmngr) of a GNUPGHOME: tests and clean shutdown."""
    subprocess.run(["gpgconf", "--homedir", gnupghome, "--kill", "all"], capture_output=True,
                   timeout=30, check=False)
