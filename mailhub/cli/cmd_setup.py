"""``init``, ``serve`` and ``users``: making an instance, running it, adding coordinators."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import shutil
import sys
import tomllib
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlmodel import Session, select

from mailhub.app import Hub
from mailhub.cli.output import add_json, hub_from, print_json
from mailhub.config import Config, check_domain, load_config, parse_config, read_secret_file
from mailhub.crypto.atrest import write_secret
from mailhub.crypto.openpgp_ops import kill_agent
from mailhub.errors import ConfigError, MailhubError, StoreError
from mailhub.fileaccess import read_user_text, user_paths

SOURCE_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_DOMAIN_LINE = 'domain = "medvoyage.example"'

INIT_EPILOG = """\
Every argument is checked before anything is written: a refused --domain leaves no files.
Run again on an existing instance, init keeps its config.toml and only adds what is missing
(rules/, templates/, keys, database). A --domain that differs from that config's [hub].domain
is refused, nothing changed: the hub's keys are made out to the configured domain. To move an
instance to another domain, edit [hub].domain in its config.toml yourself, or init a new folder.
"""

USERS_ADD_EPILOG = """\
For an address that is already a coordinator, the password is replaced (the old one stops
working at once; recorded in the audit log), and the output says so.
"""


def register(sub: Any) -> None:
    p = sub.add_parser("init", help="create an instance: config, rules, templates, keys, database",
                       description="Create an instance in DIR, or complete an existing one.",
                       epilog=INIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", nargs="?", default=".", help="folder of the new instance (default: .)")
    p.add_argument("--domain", help="the organisation's mail domain (default: from the example; "
                                    "on an existing instance it must match its config)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("serve", help="run listeners, delivery, IMAP ingest and the scheduler")
    p.set_defaults(func=cmd_serve)

    users = sub.add_parser("users", help="coordinators allowed to submit mail")
    us = users.add_subparsers(dest="users_cmd", required=True, metavar="ACTION")
    p = us.add_parser("add", help="add a coordinator, or replace an existing coordinator's "
                                  "password (password from --password-file or a prompt)",
                      epilog=USERS_ADD_EPILOG)
    p.add_argument("email")
    p.add_argument("--password-file", help="file holding the password (one trailing newline "
                                           "is stripped)")
    p.set_defaults(func=cmd_users_add)
    p = us.add_parser("list", help="list coordinators")
    add_json(p)
    p.set_defaults(func=cmd_users_list)


def _copy_default(name: str, target: Path) -> bool:
    src = SOURCE_ROOT / name
    if target.exists() or not src.exists():
        return False
    shutil.copytree(src, target)
    return True


def _new_config_text(domain: str | None) -> str:
    """config.example.toml with the chosen domain; read before anything is written."""
    example = SOURCE_ROOT / "config.example.toml"
    if not example.exists():
        raise ConfigError(f"cannot find config.example.toml next to the package ({example})",
                          hint="install mailhub from its checkout with 'pip install -e .'")
    text = read_user_text(example, "the example configuration", ConfigError)
    if domain:
        if EXAMPLE_DOMAIN_LINE not in text:
            raise ConfigError(f"{example} has no line {EXAMPLE_DOMAIN_LINE!r} to set --domain in")
        text = text.replace(EXAMPLE_DOMAIN_LINE, f'domain = "{domain}"', 1)
    return text


def _init_plan(target: Path, domain: str | None) -> tuple[Config, str | None]:
    """The instance's config and the text to write (None: keep the existing file).

    Everything is validated here, before init writes anything, so a refused argument leaves
    no half-made instance behind that a corrected re-run would then "keep".
    """
    if target.exists() and not target.is_dir():
        raise MailhubError(f"{target} exists and is not a folder",
                           hint="name a new folder, or an existing one, for the instance")
    cfg_path = target / "config.toml"
    if cfg_path.exists():
        config = load_config(cfg_path)
        if domain and domain != config.hub.domain:
            raise ConfigError(
                f"{cfg_path} already exists with domain {config.hub.domain}; "
                f"--domain {domain} was not applied and nothing was changed",
                hint=f"run init without --domain to complete the instance for "
                     f"{config.hub.domain}; to change the domain, edit [hub].domain in "
                     f"{cfg_path}, or init a new folder")
        return config, None
    text = _new_config_text(domain)
    return parse_config(tomllib.loads(text), cfg_path), text


def cmd_init(args: argparse.Namespace) -> int:
    target = Path(args.dir).resolve()
    domain = check_domain(args.domain, "--domain") if args.domain is not None else None
    config, text = _init_plan(target, domain)
    cfg_path = target / "config.toml"
    with user_paths("set up the instance"):
        target.mkdir(parents=True, exist_ok=True)
        if text is None:
            print(f"kept existing {cfg_path} (domain {config.hub.domain})")
        else:
            # 0600: [hub].database_url may be given a password later (PostgreSQL)
            write_secret(cfg_path, text.encode("utf-8"))
            print(f"wrote {cfg_path}")
        _init_files(config)
    return 0


def _init_files(config: Config) -> None:
    """Default rules and templates, the hub's keys and the database, each only if missing."""
    cfg_path = config.path
    for name, path in (("rules", config.hub.rules_dir), ("templates", config.hub.templates_dir)):
        if _copy_default(name, path):
            print(f"copied default {name}/ to {path}")
    hub = Hub(config)
    if not hub.keys.atrest_key.exists():
        _refuse_new_atrest_key_for_old_data(hub)
    had_key = bool(hub.keys.openpgp_own())
    try:
        made = hub.keys.generate_all(config.hub.domain, config.hub.display_name)
        for what, value in made.items():
            print(f"generated {what}: {value}")
        hub.migrate()
        from mailhub.crypto.keystore import record_own_keys

        record_own_keys(hub)
    except BaseException:  # a refused database too: the agent that made the key goes with init
        if not had_key:
            kill_agent(str(hub.keys.gnupg_home))
        raise
    where = (make_url(config.hub.database_url).render_as_string(hide_password=True)
             if config.hub.database_url else config.hub.data_dir)  # terminals end up in logs
    print(f"database ready: {where}")
    print(f"hub OpenPGP fingerprint: {hub.hub_fingerprint()}")
    if "openpgp" in made:  # the agent that made the key must not outlive init (a running hub's
        # agent is another matter: init only made a key when there was none, so no hub ran)
        kill_agent(str(hub.keys.gnupg_home))
    print(f"next: mailhub --config {cfg_path} users add coordinator@{config.hub.domain}")


def _refuse_new_atrest_key_for_old_data(hub: Hub) -> None:
    """A database that already has its schema was made after an at-rest key (init makes the
    keys first): with keys/atrest.key gone, a new key would leave everything sealed so far, in
    the database and the spool, unreadable for good, and init would still report success. The
    same holds for a second instance pointed at a PostgreSQL database another one set up."""
    from mailhub.store.db import driver_words, schema_revision

    try:
        revision = schema_revision(hub.engine)
    except Exception as exc:  # noqa: BLE001 - unreachable: say so before anything is made
        raise StoreError(f"cannot reach the database: {driver_words(exc, hub.engine)}",
                         hint="check [hub].database_url and that the database is reachable") from exc
    if revision is not None:
        raise MailhubError(
            f"{hub.keys.atrest_key} is missing, but the database already holds data sealed with "
            "an at-rest key; init will not make a new one (what is sealed would be lost)",
            hint="restore keys/atrest.key (and any keys/atrest-*.key) from your backup, or copy "
                 "them from the instance that set up this database, then run init again")


def cmd_serve(args: argparse.Namespace) -> int:
    from mailhub.runner import build_server

    config = load_config(args.config)
    from mailhub import logging_setup
    from mailhub.heap_reuse import keep_freed_memory

    # before any thread starts: 200 KiB messages, ciphertexts and payloads come and go, and
    # each passes between threads (one arena: freed blocks are reused by all of them)
    keep_freed_memory(one_arena=True)
    logging_setup.configure(config.log_level if not args.debug else "DEBUG", debug=args.debug)
    hub = Hub(config)

    async def run() -> None:
        server = build_server(hub)
        await server.serve_forever()

    try:
        asyncio.run(run())
    except OSError as exc:
        raise MailhubError(f"cannot start: {exc.strerror or exc}",
                           hint="is another mailhub running, or is a port in use? "
                                "check [smtp.*].listen") from exc
    return 0


def _read_password(args: argparse.Namespace) -> str:
    if args.password_file:
        return read_secret_file(Path(args.password_file), "--password-file")
    if not sys.stdin.isatty():
        raise MailhubError("no password given", hint="use --password-file FILE")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Again: "):
        raise MailhubError("the passwords differ")
    return first


def cmd_users_add(args: argparse.Namespace) -> int:
    from mailhub.ingress.auth import hash_password
    from mailhub.ingress.handlers import valid_address
    from mailhub.store import audit
    from mailhub.store.models import User

    email = args.email.strip().lower()
    if not valid_address(email):
        raise MailhubError(f"{args.email!r} is not a mail address")
    hub = hub_from(args)
    if email.rpartition("@")[2] != hub.domain:
        raise MailhubError(f"{email} is not at {hub.domain}",
                           hint="coordinators send as the organisation's own addresses")
    password = _read_password(args)
    if len(password) < 8:
        raise MailhubError("the password is shorter than 8 characters")
    with Session(hub.engine) as session:
        user = session.exec(select(User).where(User.email == email)).first()
        if user is None:
            session.add(User(email=email, password_hash=hash_password(password)))
            event, said = "user-added", f"added: {email}"
        else:
            user.password_hash = hash_password(password)
            session.add(user)
            event = "user-password"  # the audit action name kept from before
            said = (f"password replaced: {email} was already a coordinator; the new password "
                    "replaces the old one, which no longer works")
        audit.append(session, "cli", event, detail={"user": email})
        session.commit()
    print(said)
    return 0


def cmd_users_list(args: argparse.Namespace) -> int:
    from mailhub.store.models import User

    hub = hub_from(args)
    with Session(hub.engine) as session:
        users = session.exec(select(User).order_by(User.email)).all()
    rows = [{"email": u.email, "disabled": u.disabled, "created_at": u.created_at.isoformat()}
            for u in users]
    if args.json:
        print_json(rows)
    else:
        for r in rows:
            print(r["email"] + (" (disabled)" if r["disabled"] else ""))
    return 0
