"""``init``, ``serve`` and ``users``: making an instance, running it, adding coordinators."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import shutil
import sys
from pathlib import Path
from typing import Any

from sqlmodel import Session, select

from mailhub.app import Hub
from mailhub.cli.output import add_json, hub_from, print_json
from mailhub.config import load_config, read_secret_file
from mailhub.errors import ConfigError, MailhubError

SOURCE_ROOT = Path(__file__).resolve().parents[2]


def register(sub: Any) -> None:
    p = sub.add_parser("init", help="create an instance: config, rules, templates, keys, database")
    p.add_argument("dir", nargs="?", default=".", help="folder of the new instance (default: .)")
    p.add_argument("--domain", help="the organisation's mail domain (default: from the example)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("serve", help="run listeners, delivery, IMAP ingest and the scheduler")
    p.set_defaults(func=cmd_serve)

    users = sub.add_parser("users", help="coordinators allowed to submit mail")
    us = users.add_subparsers(dest="users_cmd", required=True, metavar="ACTION")
    p = us.add_parser("add", help="add a coordinator (password from --password-file or a prompt)")
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


def cmd_init(args: argparse.Namespace) -> int:
    target = Path(args.dir).resolve()
    target.mkdir(parents=True, exist_ok=True)
    cfg_path = target / "config.toml"
    example = SOURCE_ROOT / "config.example.toml"
    if not cfg_path.exists():
        if not example.exists():
            raise ConfigError(f"cannot find config.example.toml next to the package ({example})",
                              hint="install mailhub from its checkout with 'pip install -e .'")
        text = example.read_text(encoding="utf-8")
        if args.domain:
            text = text.replace('domain = "medvoyage.example"', f'domain = "{args.domain}"', 1)
        cfg_path.write_text(text, encoding="utf-8")
        print(f"wrote {cfg_path}")
    else:
        print(f"kept existing {cfg_path}")
    config = load_config(cfg_path)
    for name, path in (("rules", config.hub.rules_dir), ("templates", config.hub.templates_dir)):
        if _copy_default(name, path):
            print(f"copied default {name}/ to {path}")
    hub = Hub(config)
    made = hub.keys.generate_all(config.hub.domain, config.hub.display_name)
    for what, value in made.items():
        print(f"generated {what}: {value}")
    hub.migrate()
    from mailhub.crypto.keystore import record_own_keys

    record_own_keys(hub)
    print(f"database ready: {config.hub.db_url if config.hub.database_url else config.hub.data_dir}")
    print(f"hub OpenPGP fingerprint: {hub.hub_fingerprint()}")
    print(f"next: mailhub --config {cfg_path} users add coordinator@{config.hub.domain}")
    return 0


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
        try:
            return read_secret_file(Path(args.password_file))
        except OSError as exc:
            raise MailhubError(f"cannot read {args.password_file}: {exc.strerror}") from exc
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
            action = "added"
        else:
            user.password_hash = hash_password(password)
            session.add(user)
            action = "password changed"
        audit.append(session, "cli", "user-" + action.split()[0], detail={"user": email})
        session.commit()
    print(f"{action}: {email}")
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
