"""Configuration: read once into typed objects, validated at start, passed down explicitly.

There is no module-level configuration object; ``load_config`` returns a ``Config`` that the
caller hands to whatever needs it. Every error names the key and says how to fix it.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailhub.errors import ConfigError, FileAccessError, MailhubError
from mailhub.fileaccess import read_user_text

STARTTLS_MODES = ("opportunistic", "required", "off")
IMAP_TLS_MODES = ("starttls", "ssl", "off")


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class HubConfig:
    domain: str
    data_dir: Path
    database_url: str = field(repr=False)  # may carry a database password
    keys_dir: Path
    rules_dir: Path
    templates_dir: Path
    display_name: str = "mailhub"
    postmaster: str = ""

    @property
    def postmaster_address(self) -> str:
        return self.postmaster or f"postmaster@{self.domain}"

    @property
    def db_url(self) -> str:
        """The SQLAlchemy URL: the configured one, or SQLite in data_dir."""
        return self.database_url or f"sqlite:///{self.data_dir / 'mailhub.db'}"


@dataclass(frozen=True)
class ListenerConfig:
    listen: HostPort
    max_message_size: int = 26214400
    require_tls_for_auth: bool = True
    auth_failures_before_delay: int = 3
    max_connections_per_client: int = 20
    max_connections: int = 500


@dataclass(frozen=True)
class DeliveryConfig:
    smarthost: HostPort
    starttls: str = "opportunistic"
    ca_file: Path | None = None
    internal_relay: HostPort | None = None
    workers: int = 4
    retry_initial: int = 60
    retry_max: int = 3600
    give_up_after: int = 432000
    keep_sent_payloads: int = 86400


@dataclass(frozen=True)
class CryptoConfig:
    allow_keyserver: bool = False
    keyserver: str = ""
    workers: int = 0

    @property
    def worker_count(self) -> int:
        return self.workers or (os.cpu_count() or 1)


@dataclass(frozen=True)
class ImapConfig:
    host: str = ""
    port: int = 143
    tls: str = "starttls"
    username: str = ""
    password_file: Path | None = None
    watch: tuple[str, ...] = ("INBOX",)
    case_folder_prefix: str = "Cases"
    poll_interval: int = 30

    @property
    def enabled(self) -> bool:
        return bool(self.host)

    def password(self) -> str:
        if self.password_file is None:
            raise ConfigError("[imap].password_file is not set", hint="name a file holding the password")
        try:
            return read_secret_file(self.password_file, "[imap].password_file", ConfigError)
        except ConfigError as exc:
            raise ConfigError(exc.message,
                              hint="create it with the mailbox password (mode 0600)") from exc


@dataclass(frozen=True)
class SchedulerConfig:
    quiet_hours: tuple[str, str] = ("21:00", "08:00")
    check_interval: int = 60


@dataclass(frozen=True)
class Config:
    path: Path
    hub: HubConfig
    inbound: ListenerConfig
    submission: ListenerConfig
    delivery: DeliveryConfig
    crypto: CryptoConfig = field(default_factory=CryptoConfig)
    imap: ImapConfig = field(default_factory=ImapConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    log_level: str = "INFO"

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @property
    def spool_dir(self) -> Path:
        return self.hub.data_dir / "spool"

    @property
    def gnupg_home(self) -> Path:
        return self.hub.keys_dir / "gnupg"


def read_secret_file(path: Path, what: str = "password file",
                     error: type[MailhubError] = FileAccessError) -> str:
    """Read a password file, stripping exactly one trailing newline (as the brief says).

    A missing, unreadable or non-UTF-8 file is an ``error`` that names it, so no caller can
    let it out as a crash.
    """
    text = read_user_text(path, what, error)
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith("\n"):
        return text[:-1]
    return text


def default_config_path() -> Path:
    env = os.environ.get("MAILHUB_CONFIG")
    return Path(env) if env else Path("config.toml")


def load_config(path: Path | str | None = None) -> Config:
    """Read and validate the configuration file; raise ConfigError saying how to fix it.

    ``path`` may also name an instance folder (one holding ``config.toml``): the README calls
    that folder the instance, so ``--config DIR`` means ``DIR/config.toml``.
    """
    cfg_path = Path(path) if path is not None else default_config_path()
    if cfg_path.is_dir():
        if not (cfg_path / "config.toml").is_file():
            raise ConfigError(
                f"{cfg_path} is a folder without a config.toml",
                hint=f"--config must name the configuration file, e.g. {cfg_path / 'config.toml'}"
                f"; or run 'mailhub init {cfg_path}' to make an instance there",
            )
        cfg_path = cfg_path / "config.toml"
    if not cfg_path.exists():
        raise ConfigError(
            f"configuration file {cfg_path} not found",
            hint="run 'mailhub init DIR' to create one, or pass --config PATH "
            "(or set MAILHUB_CONFIG)",
        )
    text = read_user_text(cfg_path, "configuration file", ConfigError)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{cfg_path} is not valid TOML: {exc}") from exc
    return parse_config(raw, cfg_path.resolve())


class _Section:
    """Typed access to one TOML table, with errors that name the key."""

    def __init__(self, name: str, data: Any, known: set[str] | None = None) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"[{name}] must be a table")
        self.name = name
        self.data = data
        if known is not None:
            unknown = sorted(set(data) - known)
            if unknown:
                raise ConfigError(
                    f"unknown key(s) in [{name}]: {', '.join(unknown)}",
                    hint="see config.example.toml for the keys this version reads",
                )

    def _get(self, key: str, default: Any, kind: type) -> Any:
        value = self.data.get(key, default)
        # bool is an int in Python, but `workers = true` is not a number in a config file
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            expected = _KIND_WORDS.get(kind, f"a {kind.__name__}")
            raise ConfigError(f"[{self.name}].{key} must be {expected}, not {value!r}")
        return value

    def str(self, key: str, default: str = "") -> str:
        return self._get(key, default, str).strip()

    def int(self, key: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
        value = self._get(key, default, int)
        if value < minimum:
            raise ConfigError(f"[{self.name}].{key} must be at least {minimum}, not {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"[{self.name}].{key} must be at most {maximum}, not {value}")
        return value

    def bool(self, key: str, default: bool) -> bool:
        return self._get(key, default, bool)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.str(key, default)
        if value not in choices:
            raise ConfigError(
                f"[{self.name}].{key} = {value!r} is not one of: {', '.join(choices)}"
            )
        return value

    def hostport(self, key: str, default: str = "", *, optional: bool = False) -> HostPort | None:
        value = self.str(key, default)
        if not value:
            if optional:
                return None
            raise ConfigError(f"[{self.name}].{key} is required (host:port)")
        return parse_hostport(value, f"[{self.name}].{key}")


def parse_hostport(value: str, where: str) -> HostPort:
    m = re.fullmatch(r"\[?([^\[\]]+?)\]?:(\d+)", value.strip())
    if not m:
        raise ConfigError(f"{where} = {value!r} is not host:port", hint="e.g. \"127.0.0.1:2525\"")
    port = int(m.group(2))
    if not 1 <= port <= 65535:
        raise ConfigError(f"{where} = {value!r}: the port must be 1-65535, not {port}",
                          hint="e.g. \"127.0.0.1:2525\"")
    return HostPort(m.group(1), port)


def parse_quiet_hours(value: str, where: str = "[scheduler].quiet_hours") -> tuple[str, str]:
    m = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", value)
    if not m or int(m.group(1)) > 23 or int(m.group(3)) > 23 or int(m.group(2)) > 59 or int(m.group(4)) > 59:
        raise ConfigError(f"{where} = {value!r} is not HH:MM-HH:MM", hint='e.g. "21:00-08:00"')
    return (f"{int(m.group(1)):02d}:{m.group(2)}", f"{int(m.group(3)):02d}:{m.group(4)}")


_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}$", re.I)
_KIND_WORDS: dict[type, str] = {int: "an integer", str: "a string (in quotes)",
                                bool: "true or false", float: "a number", list: "a list",
                                dict: "a table"}


def check_domain(value: str, where: str = "[hub].domain") -> str:
    """The domain lower-cased, or a ConfigError naming ``where`` (a key, or --domain)."""
    domain = value.strip().lower()
    if not _DOMAIN.match(domain):
        shown = f"{where} {value!r}" if where.startswith("--") else f"{where} = {value!r}"
        raise ConfigError(f"{shown} is not a mail domain", hint='e.g. "medvoyage.example"')
    return domain


def parse_config(raw: dict[str, Any], path: Path) -> Config:
    base = path.parent

    def rel(p: str) -> Path:
        return (base / p).resolve() if p else base

    known_top = {"hub", "smtp", "delivery", "crypto", "imap", "scheduler", "log"}
    unknown = sorted(set(raw) - known_top)
    if unknown:
        raise ConfigError(f"unknown section(s) in {path.name}: {', '.join(unknown)}")

    hub = _Section("hub", raw.get("hub", {}), {
        "domain", "data_dir", "database_url", "keys_dir", "rules_dir", "templates_dir",
        "display_name", "postmaster"})
    domain = check_domain(hub.str("domain"))
    from mailhub.store.db import check_database_url

    db_url = check_database_url(hub.str("database_url"))
    postmaster = hub.str("postmaster")
    hub_cfg = HubConfig(
        domain=domain,
        data_dir=rel(hub.str("data_dir", "var")),
        database_url=db_url,
        keys_dir=rel(hub.str("keys_dir", "keys")),
        rules_dir=rel(hub.str("rules_dir", "rules")),
        templates_dir=rel(hub.str("templates_dir", "templates")),
        display_name=hub.str("display_name", "mailhub") or "mailhub",
        postmaster=postmaster,
    )

    smtp = _Section("smtp", raw.get("smtp", {}), {"inbound", "submission"})
    limits = {"max_connections_per_client", "max_connections"}
    inb = _Section("smtp.inbound", smtp.data.get("inbound", {}),
                   {"listen", "max_message_size"} | limits)
    sub = _Section("smtp.submission", smtp.data.get("submission", {}), {
        "listen", "max_message_size", "require_tls_for_auth", "auth_failures_before_delay"}
        | limits)
    inbound = ListenerConfig(
        listen=inb.hostport("listen", "127.0.0.1:2525"),  # type: ignore[arg-type]
        max_message_size=inb.int("max_message_size", 26214400, 1024),
        max_connections_per_client=inb.int("max_connections_per_client", 20, 1),
        max_connections=inb.int("max_connections", 500, 1),
    )
    submission = ListenerConfig(
        listen=sub.hostport("listen", "127.0.0.1:5587"),  # type: ignore[arg-type]
        max_message_size=sub.int("max_message_size", 26214400, 1024),
        require_tls_for_auth=sub.bool("require_tls_for_auth", True),
        auth_failures_before_delay=sub.int("auth_failures_before_delay", 3, 1),
        max_connections_per_client=sub.int("max_connections_per_client", 20, 1),
        max_connections=sub.int("max_connections", 500, 1),
    )

    dl = _Section("delivery", raw.get("delivery", {}), {
        "smarthost", "starttls", "ca_file", "internal_relay", "workers", "retry_initial",
        "retry_max", "give_up_after", "keep_sent_payloads"})
    ca = dl.str("ca_file")
    delivery = DeliveryConfig(
        smarthost=dl.hostport("smarthost", "127.0.0.1:2526"),  # type: ignore[arg-type]
        starttls=dl.choice("starttls", "opportunistic", STARTTLS_MODES),
        ca_file=rel(ca) if ca else None,
        internal_relay=dl.hostport("internal_relay", "", optional=True),
        workers=dl.int("workers", 4, 1),
        retry_initial=dl.int("retry_initial", 60, 1),
        retry_max=dl.int("retry_max", 3600, 1),
        give_up_after=dl.int("give_up_after", 432000, 1),
        keep_sent_payloads=dl.int("keep_sent_payloads", 86400, 0),
    )

    cr = _Section("crypto", raw.get("crypto", {}), {"allow_keyserver", "keyserver", "workers"})
    crypto = CryptoConfig(
        allow_keyserver=cr.bool("allow_keyserver", False),
        keyserver=cr.str("keyserver"),
        workers=cr.int("workers", 0, 0),
    )
    if crypto.allow_keyserver and not crypto.keyserver:
        raise ConfigError("[crypto].allow_keyserver is true but [crypto].keyserver is empty",
                          hint="name a keyserver, or leave allow_keyserver = false")

    im = _Section("imap", raw.get("imap", {}), {
        "host", "port", "tls", "username", "password_file", "watch", "case_folder_prefix",
        "poll_interval"})
    watch = im.data.get("watch", ["INBOX"])
    if not isinstance(watch, list) or not all(isinstance(w, str) and w for w in watch):
        raise ConfigError('[imap].watch must be a list of folder names, e.g. ["INBOX"]')
    pw = im.str("password_file")
    imap = ImapConfig(
        host=im.str("host"),
        port=im.int("port", 143, 1, 65535),
        tls=im.choice("tls", "starttls", IMAP_TLS_MODES),
        username=im.str("username"),
        password_file=rel(pw) if pw else None,
        watch=tuple(watch),
        case_folder_prefix=im.str("case_folder_prefix", "Cases") or "Cases",
        poll_interval=im.int("poll_interval", 30, 1),
    )
    if imap.enabled and not (imap.username and imap.password_file):
        raise ConfigError("[imap].host is set but username or password_file is missing",
                          hint="set both, or leave [imap].host empty to turn IMAP off")

    sc = _Section("scheduler", raw.get("scheduler", {}), {"quiet_hours", "check_interval"})
    scheduler = SchedulerConfig(
        quiet_hours=parse_quiet_hours(sc.str("quiet_hours", "21:00-08:00")),
        check_interval=sc.int("check_interval", 60, 1),
    )

    lg = _Section("log", raw.get("log", {}), {"level"})
    level = lg.choice("level", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR"))

    return Config(path=path, hub=hub_cfg, inbound=inbound, submission=submission,
                  delivery=delivery, crypto=crypto, imap=imap, scheduler=scheduler,
                  log_level=level)
