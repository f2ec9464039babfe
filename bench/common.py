"""Benchmark set-up: a real ``mailhub init`` instance, recipients with real keys, ``mailhub serve``.

Everything is made fresh in a short /tmp folder (gpg's agent socket path must stay short): the
hub's keys by ``mailhub init``, an OpenPGP recipient key by the gpg command line (ed25519 +
cv25519), an S/MIME recipient certificate (RSA-2048), and a ``[[plaintext]]`` rule file. The hub
runs as a real subprocess, exactly as ``mailhub serve`` runs in production.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.loadgen import free_port, proc_cpu, wait_port

REPO = Path(__file__).resolve().parents[1]
COORD = "coord@medvoyage.example"
PASSWORD = "bench password 1"
PLAIN_RCPT = "desk@travel-bench.example"
PGP_RCPT = "records@pgp-bench.example"
SMIME_RCPT = "records@smime-bench.example"


def mailhub(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "mailhub", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    if check and proc.returncode != 0:
        raise RuntimeError(f"mailhub {' '.join(args)} failed: {proc.stderr}")
    return proc


def gpg(home: Path, *args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--yes",
                           "--pinentry-mode", "loopback", "--passphrase", "", *args],
                          input=data, capture_output=True, timeout=120, check=True)


def set_config(cfg: Path, values: dict[str, str]) -> None:
    """Replace ``key = ...`` lines, each the first one after its ``[section]`` header."""
    text = cfg.read_text()
    for dotted, value in values.items():
        section, key = dotted.rsplit(".", 1)
        start = text.index(f"[{section}]")
        m = re.compile(rf"^{key} = .*$", re.M).search(text, start)
        if m is None:
            raise KeyError(dotted)
        text = text[: m.start()] + f"{key} = {value}" + text[m.end():]
    cfg.write_text(text)


@dataclass
class BenchHub:
    root: Path
    config: Path
    submission_port: int
    inbound_port: int

    @property
    def db(self) -> Path:
        return self.root / "var" / "mailhub.db"

    @property
    def tls_cert(self) -> Path:
        return self.root / "keys" / "tls.crt"

    @property
    def tls_key(self) -> Path:
        return self.root / "keys" / "tls.key"

    def sql(self, query: str, *params: object) -> list[tuple[object, ...]]:
        con = sqlite3.connect(self.db, timeout=30)
        try:
            return list(con.execute(query, params))
        finally:
            con.close()

    def sent_count(self) -> int:
        return int(self.sql("SELECT count(*) FROM outbound WHERE status = 'sent'")[0][0])  # type: ignore[arg-type]


def make_recipient_pgp(tmp: Path, address: str) -> Path:
    home = Path(tempfile.mkdtemp(prefix="mhg", dir="/tmp"))
    gpg(home, "--quick-gen-key", f"Bench <{address}>", "ed25519", "sign", "1y")
    listing = gpg(home, "--with-colons", "--list-keys", address).stdout.decode()
    fpr = [ln.split(":")[9] for ln in listing.splitlines() if ln.startswith("fpr")][0]
    gpg(home, "--quick-add-key", fpr, "cv25519", "encr", "1y")
    pub = tmp / f"{address}.asc"
    pub.write_bytes(gpg(home, "--armor", "--export", address).stdout)
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)
    shutil.rmtree(home, ignore_errors=True)
    return pub


def make_recipient_smime(tmp: Path, address: str) -> Path:
    from mailhub.crypto.selfsigned import generate_smime_identity

    _key, cert = generate_smime_identity(address, "Bench Clinic")
    path = tmp / f"{address}.crt"
    path.write_bytes(cert)
    return path


def make_hub(root: Path, smarthost_port: int, extra: dict[str, str] | None = None) -> BenchHub:
    """A real instance with a coordinator, both recipients' keys and a plaintext rule."""
    root.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "mailhub", "init", str(root / "hub")],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    hub_root = root / "hub"
    cfg = hub_root / "config.toml"
    sub, inb = free_port(), free_port()
    values = {"smtp.submission.listen": f'"127.0.0.1:{sub}"',
              "smtp.inbound.listen": f'"127.0.0.1:{inb}"',
              "delivery.smarthost": f'"127.0.0.1:{smarthost_port}"',
              "delivery.retry_initial": "1", "delivery.retry_max": "2"}
    values.update(extra or {})
    set_config(cfg, values)
    (hub_root / "rules" / "bench.toml").write_text(
        f'[[plaintext]]\naddress = "{PLAIN_RCPT}"\nreason = "benchmark: no health data"\n')
    pw = root / "pw"
    pw.write_text(PASSWORD + "\n")
    mailhub(cfg, "users", "add", COORD, "--password-file", str(pw))
    mailhub(cfg, "keys", "import", str(make_recipient_pgp(root, PGP_RCPT)))
    mailhub(cfg, "keys", "import", str(make_recipient_smime(root, SMIME_RCPT)))
    return BenchHub(hub_root, cfg, sub, inb)


class Serve:
    """``python -m mailhub --config CFG serve`` as a subprocess; its log goes to a file."""

    def __init__(self, hub: BenchHub, log_name: str = "serve.log") -> None:
        self.hub = hub
        self.log_path = hub.root / log_name
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> Serve:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it open
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "mailhub", "--config",
                                      str(self.hub.config), "serve"],
                                     stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                     start_new_session=True)
        log.close()
        end = time.monotonic() + timeout
        for port in (self.hub.submission_port, self.hub.inbound_port):
            wait_port(port, timeout=max(1.0, end - time.monotonic()))
            if self.proc.poll() is not None:
                raise RuntimeError(f"mailhub serve exited: {self.log_path.read_text()[-2000:]}")
        return self

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid) if self.proc else 0.0

    def kill(self) -> None:
        """SIGKILL the whole process group (the server and its crypto workers, like a crash)."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(30)
            self.proc = None

    def stop(self, timeout: float = 60) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9
        self.proc = None
        return rc

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def short_tmp() -> Path:
    return Path(tempfile.mkdtemp(prefix="mhb", dir="/tmp"))


def cleanup(root: Path) -> None:
    for home in root.rglob("gnupg"):
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)
