"""A short, watchable walk through mailhub's mail flow on loopback (used by scripts/demo.sh).

It creates an instance in ./demo, plays a clinic with its own gpg keyring, starts a stand-in
smarthost that prints what reaches it, runs `mailhub serve`, and sends two messages as a
coordinator: one to the clinic (leaves encrypted, the clinic decrypts it) and one to an address
without a key (held; the coordinator is told). Press Ctrl-C at the end to stop the hub.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

ROOT = Path(__file__).resolve().parents[1]
COORD = "coordinator@medvoyage.example"
CLINIC = "records@clinic-a.example"


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Smarthost:
    def __init__(self) -> None:
        self.received: list[tuple[list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append((list(envelope.rcpt_tos), envelope.original_content))
        head = envelope.original_content.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
        subject = [ln for ln in head.splitlines() if ln.lower().startswith("subject:")]
        ctype = [ln for ln in head.splitlines() if ln.lower().startswith("content-type:")]
        print(f"   [smarthost] got mail for {', '.join(envelope.rcpt_tos)}: "
              f"{subject[0] if subject else ''} | {ctype[0] if ctype else ''}", flush=True)
        return "250 OK"


def mailhub(cfg: Path, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "mailhub", "--config", str(cfg), *args],
                         capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        raise SystemExit(out.returncode)
    return out.stdout


def wait_port(port: int, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"mailhub did not start listening on {port}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default=str(ROOT / "demo"), help="instance folder (./demo)")
    parser.add_argument("--no-wait", action="store_true", help="stop the hub at the end")
    args = parser.parse_args()
    inst = Path(args.dir)
    if inst.exists():
        shutil.rmtree(inst)
    say(f"mailhub init {inst}")
    subprocess.run([sys.executable, "-m", "mailhub", "init", str(inst)], check=True)
    cfg = inst / "config.toml"
    smart_port = free_port()
    text = cfg.read_text().replace('smarthost = "127.0.0.1:2526"', f'smarthost = "127.0.0.1:{smart_port}"')
    cfg.write_text(text)

    say("a coordinator account")
    pw = inst / "keys" / "coordinator.password"
    pw.write_text("demo-password-123\n")
    os.chmod(pw, 0o600)
    print(mailhub(cfg, "users", "add", COORD, "--password-file", str(pw)).strip())

    say("the clinic makes its own OpenPGP key (gpg, its own keyring) and sends us the public part")
    clinic_home = Path(tempfile.mkdtemp(prefix="mhclinic", dir="/tmp"))
    gpg = ["gpg", "--homedir", str(clinic_home), "--batch", "--pinentry-mode", "loopback",
           "--passphrase", ""]
    subprocess.run([*gpg, "--quick-gen-key", f"Clinic A <{CLINIC}>", "ed25519", "sign", "1y"],
                   check=True, capture_output=True)
    fpr = [ln.split(":")[9] for ln in subprocess.run(
        [*gpg, "--with-colons", "--list-keys", CLINIC], capture_output=True, text=True,
        check=True).stdout.splitlines() if ln.startswith("fpr")][0]
    subprocess.run([*gpg, "--quick-add-key", fpr, "cv25519", "encr", "1y"], check=True,
                   capture_output=True)
    pub = inst / "clinic-a.asc"
    pub.write_bytes(subprocess.run([*gpg, "--armor", "--export", CLINIC], capture_output=True,
                                   check=True).stdout)
    print(mailhub(cfg, "keys", "import", str(pub)).strip())
    hub_pub = mailhub(cfg, "keys", "export-hub")
    subprocess.run([*gpg, "--import"], input=hub_pub.encode(), capture_output=True, check=True)
    print(mailhub(cfg, "keys", "list"))

    say(f"a stand-in smarthost on 127.0.0.1:{smart_port} prints what leaves the hub")
    sink = Smarthost()
    controller = Controller(sink, hostname="127.0.0.1", port=smart_port)
    controller.start()

    say("mailhub serve")
    server = subprocess.Popen([sys.executable, "-m", "mailhub", "--config", str(cfg), "serve"])
    try:
        wait_port(5587)
        wait_port(2525)
        say("the coordinator sends case mail (STARTTLS + AUTH on the submission port 5587)")
        msg = EmailMessage()
        msg["From"] = COORD
        msg["To"] = f"{CLINIC}, patient-without-key@example.org"
        msg["Subject"] = "Pre-op bloods for Ana Souza"
        msg.set_content("Hb 13.2 g/dL, INR 1.0. Surgery confirmed for 3 December.")
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the demo's self-signed TLS certificate
        with smtplib.SMTP("127.0.0.1", 5587) as s:
            s.starttls(context=ctx)
            s.login(COORD, "demo-password-123")
            s.send_message(msg)
        print("   submitted: 250")
        end = time.monotonic() + 30
        while len(sink.received) < 2 and time.monotonic() < end:
            time.sleep(0.2)

        say("what the clinic received, decrypted by the clinic's own gpg")
        for rcpts, data in sink.received:
            if rcpts == [CLINIC]:
                armored = data[data.index(b"-----BEGIN PGP MESSAGE-----"):]
                dec = subprocess.run([*gpg, "--decrypt"], input=armored, capture_output=True)
                print(dec.stdout.decode("utf-8", "replace"))
                print("   gpg says:", [ln for ln in dec.stderr.decode().splitlines()
                                       if "Good signature" in ln])
        say("mailhub queue list: the keyless recipient's copy is held, never sent in plaintext")
        rows = json.loads(mailhub(cfg, "queue", "list", "--json"))
        for r in rows:
            print(f"   {r['id']:>3}  {r['status']:<6}  {r['recipient']}")
            for line in textwrap.wrap(r["reason"], 88):  # the whole reason: it says what to do
                print(f"              {line}")
        if args.no_wait:
            return 0
        say("the hub keeps running (submission 127.0.0.1:5587, inbound 127.0.0.1:2525); "
            "Ctrl-C stops it")
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.terminate()
        server.wait(30)
        controller.stop()
        subprocess.run(["gpgconf", "--homedir", str(clinic_home), "--kill", "all"])
        shutil.rmtree(clinic_home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
