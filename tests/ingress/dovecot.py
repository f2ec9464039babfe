"""A private, throwaway Dovecot IMAP server for tests (real server, loopback, unprivileged port).

Why a module of its own: several test files (and maybe other test folders) need a real IMAP
server; this starts one from the distribution's ``/usr/sbin/dovecot`` with a configuration, state,
logs and mail storage all under one temporary directory, so the system's own Dovecot (if the
package started one on port 143) is neither used nor disturbed. Only ``apt-get install
dovecot-imapd`` is needed on the machine.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.ingress.tls_material import make_tls_cert

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
START_TIMEOUT = 15.0


class DovecotError(RuntimeError):
    """The test Dovecot could not be started (the message includes its log)."""


@dataclass(frozen=True)
class ImapUser:
    username: str
    password: str


def dovecot_version(binary: str = DOVECOT) -> tuple[int, int]:
    """Major and minor version of the installed Dovecot, to pick the config dialect."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise DovecotError(f"cannot run {binary} ({exc}): apt-get install dovecot-imapd") from exc
    m = re.match(r"\s*(\d+)\.(\d+)", out)
    if not m:
        raise DovecotError(f"cannot read the Dovecot version from {out!r}")
    return int(m.group(1)), int(m.group(2))


def free_port() -> int:
    """A loopback port that was free a moment ago (Dovecot binds it with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _existing_user(*names: str) -> str:
    for name in names:
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise DovecotError(f"none of the users {names} exists")


def _service_users() -> tuple[str, str, int, int]:
    """(internal user, login user, mail uid, mail gid) that work for the current process.

    As root, Dovecot refuses to run its helpers or open mail as root: use the package's own
    system users (or nobody) and give the virtual users nobody's uid. As an ordinary user,
    everything runs as that user.
    """
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid()).pw_name
        return me, me, os.geteuid(), os.getegid()
    internal = _existing_user("dovecot", "nobody")
    login = _existing_user("dovenull", "nobody")
    nobody = pwd.getpwnam("nobody")
    return internal, login, nobody.pw_uid, nobody.pw_gid


def _config_23(d: Path, port: int, internal: str, login: str, ssl_lines: str, ns: str,
                cap: str) -> str:
    return f"""\
instance_name = mhtest-{port}
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/log/dovecot.log
info_log_path = {d}/log/dovecot.log
protocols = imap
listen = 127.0.0.1
{ssl_lines}
disable_plaintext_auth = no
auth_mechanisms = plain login
default_internal_user = {internal}
default_login_user = {login}
first_valid_uid = 1
mail_location = maildir:{d}/mail/%u
mail_fsync = never
mailbox_idle_check_interval = 1 secs
imap_idle_notify_interval = 1 mins
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {d}/users
}}
namespace inbox {{
  inbox = yes
{ns}}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service auth {{
  chroot =
}}
protocol imap {{
  mail_max_userip_connections = 200
{cap}}}
"""


def _config_24(d: Path, port: int, internal: str, login: str, ssl_lines: str, ns: str,
                cap: str) -> str:
    return f"""\
dovecot_config_version = 2.4.0
dovecot_storage_version = 2.4.0
instance_name = mhtest-{port}
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/log/dovecot.log
info_log_path = {d}/log/dovecot.log
protocols = imap
listen = 127.0.0.1
{ssl_lines}
auth_allow_cleartext = yes
auth_mechanisms = plain login
default_internal_user = {internal}
default_login_user = {login}
first_valid_uid = 1
mail_driver = maildir
mail_path = {d}/mail/%{{user}}
mail_fsync = never
mailbox_idle_check_interval = 1s
imap_idle_notify_interval = 1m
passdb passwd-file {{
  driver = passwd-file
  passwd_file_path = {d}/users
}}
userdb passwd-file {{
  driver = passwd-file
  passwd_file_path = {d}/users
}}
namespace inbox {{
  inbox = yes
{ns}}}
service imap-login {{
  chroot =
  inet_listener imap {{
    listen = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service auth {{
  chroot =
}}
protocol imap {{
  mail_max_userip_connections = 200
{cap}}}
"""


class Dovecot:
    """One private Dovecot instance; ``start()``, ``restart()`` and ``stop()`` for the tests.

    ``separator`` forces the namespace's hierarchy separator (None keeps Dovecot's default for
    maildir, which is "."); ``tls`` turns on STARTTLS with a certificate made here (``ca_file``
    is the file a client trusts); ``capability`` overrides the advertised IMAP capabilities
    (e.g. to hide IDLE and UIDPLUS).
    """

    def __init__(
        self,
        *,
        separator: str | None = None,
        tls: bool = False,
        capability: str | None = None,
        users: tuple[str, ...] = ("intake@medvoyage.example", "coordinator@medvoyage.example"),
    ) -> None:
        self.version = dovecot_version()
        self.dir = Path(tempfile.mkdtemp(prefix="mhdc", dir="/tmp"))
        self.host = "127.0.0.1"
        self.port = free_port()
        self.users = tuple(ImapUser(u, secrets.token_urlsafe(18)) for u in users)
        self._separator = separator
        self._capability = capability
        self._tls = make_tls_cert(self.dir / "tls") if tls else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_files()

    # -- what tests read ---------------------------------------------------------------------
    @property
    def username(self) -> str:
        return self.users[0].username

    @property
    def password(self) -> str:
        return self.users[0].password

    @property
    def ca_file(self) -> Path | None:
        return self._tls[0] if self._tls else None

    @property
    def separator(self) -> str:
        """The hierarchy separator the server reports (asked over IMAP, not assumed)."""
        from imapclient import IMAPClient

        with IMAPClient(self.host, self.port, ssl=False, timeout=10) as c:
            if self._tls:
                c.starttls(ssl.create_default_context(cafile=str(self._tls[0])))
            c.login(self.username, self.password)
            personal = c.namespace().personal
            sep = personal[0][1] if personal else None
        if isinstance(sep, bytes):
            sep = sep.decode()
        if not sep:
            raise DovecotError("the server reports no hierarchy separator")
        return sep

    @property
    def log_text(self) -> str:
        try:
            return (self.dir / "log" / "dovecot.log").read_text(errors="replace")
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- set-up --------------------------------------------------------------------------------
    def _write_files(self) -> None:
        internal, login, uid, gid = _service_users()
        d = self.dir
        for sub in ("run", "state", "log", "mail", "home"):
            (d / sub).mkdir(exist_ok=True)
        # The mail processes run as the virtual users' uid: they must reach and own their dirs.
        os.chmod(d, 0o755)
        for sub in ("mail", "home"):
            os.chown(d / sub, uid, gid)
        lines = [
            f"{u.username}:{{PLAIN}}{u.password}:{uid}:{gid}::{d}/home/{u.username}::"
            for u in self.users
        ]
        users_file = d / "users"
        users_file.write_text("\n".join(lines) + "\n")
        os.chmod(users_file, 0o600)
        if os.geteuid() == 0:  # the auth process reads it as the internal user
            ent = pwd.getpwnam(internal)
            os.chown(users_file, ent.pw_uid, ent.pw_gid)
        if self._tls:
            cert, key = self._tls
            ssl_lines = f"ssl = yes\nssl_cert = <{cert}\nssl_key = <{key}\n"
            if self.version >= (2, 4):
                ssl_lines = (f"ssl = yes\nssl_server_cert_file = {cert}\n"
                             f"ssl_server_key_file = {key}\n")
        else:
            ssl_lines = "ssl = no\n"
        ns = f"  separator = {self._separator}\n" if self._separator else ""
        make = _config_24 if self.version >= (2, 4) else _config_23
        cap = f"  imap_capability = {self._capability}\n" if self._capability else ""
        (d / "dovecot.conf").write_text(make(d, self.port, internal, login, ssl_lines, ns, cap))

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start in the foreground (a child we own) and wait until IMAP answers."""
        if self.running:
            return
        self._proc = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(self.dir / "dovecot.conf")],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                out = self._proc.stdout.read().decode(errors="replace") if self._proc.stdout else ""
                self._proc = None
                raise DovecotError(f"dovecot exited at start:\n{out}\n{self.log_text}")
            if self._greets():
                return
            time.sleep(0.05)
        self.stop()
        raise DovecotError(f"dovecot did not answer on port {self.port}:\n{self.log_text}")

    def _greets(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as s:
                return s.recv(64).startswith(b"* OK")
        except OSError:
            return False

    def stop(self, graceful: bool = True) -> None:
        """Stop the server and wait until its port is closed (all connections drop).

        ``graceful`` sends SIGTERM (Dovecot's own shutdown, about a second); otherwise the
        whole process group is killed at once (a crash, and a fast clean-up).
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if graceful and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # Mail processes can outlive the master (they keep serving their client): end the
        # whole process group so a restart really cuts every connection.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=10)  # reap it: a zombie's pid would look like a running master
        except subprocess.TimeoutExpired:
            pass
        # SIGKILL is delivered asynchronously: a helper still holding a socket would make the
        # next start fail with "already running".
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _group_alive(proc.pid):
            time.sleep(0.02)
        (self.dir / "run" / "master.pid").unlink(missing_ok=True)
        if proc.stdout:
            proc.stdout.close()
        # Dovecot's children may outlive the master by a moment; wait until nobody answers.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self._greets():
            time.sleep(0.05)

    def restart(self, graceful: bool = True) -> None:
        """Simulate a server restart: every open connection is cut, the same port comes back."""
        self.stop(graceful)
        self.start()

    def cleanup(self) -> None:
        self.stop(graceful=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Dovecot:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()



def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process of this process group remains (Linux /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False
