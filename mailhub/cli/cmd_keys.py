"""``keys import|import-own|list|export-hub``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mailhub.cli.output import add_json, hub_from, print_json, print_table


def register(sub: Any) -> None:
    keys = sub.add_parser("keys", help="partners', patients' and the hub's keys")
    ks = keys.add_subparsers(dest="keys_cmd", required=True, metavar="ACTION")
    p = ks.add_parser("import", help="import an OpenPGP public key (armored) or an S/MIME "
                                     "certificate (PEM) for a partner or patient")
    p.add_argument("file")
    p.add_argument("--address", help="refuse the key unless it is for this address")
    add_json(p)
    p.set_defaults(func=cmd_import)
    p = ks.add_parser("import-own", help="import one of the organisation's private keys as a "
                                         "hub key (OpenPGP secret key, or PEM key + certificate)")
    p.add_argument("file")
    p.add_argument("--cert", help="the certificate, when not in FILE")
    p.set_defaults(func=cmd_import_own)
    p = ks.add_parser("list", help="known keys: address, kind, fingerprint, expiry, source")
    add_json(p)
    p.set_defaults(func=cmd_list)
    p = ks.add_parser("export-hub", help="print the hub's public OpenPGP key (armored)")
    p.add_argument("--smime", action="store_true", help="print the hub's S/MIME certificate")
    p.set_defaults(func=cmd_export_hub)


def cmd_import(args: argparse.Namespace) -> int:
    from mailhub.crypto.keystore import import_key_file

    hub = hub_from(args)
    outcome = import_key_file(hub, Path(args.file), address=args.address)
    rows = [{"address": r.address, "kind": r.kind, "fingerprint": r.fingerprint,
             "expires": r.expires.isoformat() if r.expires else None, "source": r.source,
             "changed": r.address in outcome.changed,
             "usable": r.usable and not r.revoked} for r in outcome.records]
    if args.json:
        print_json(rows)
        return 0
    for r in rows:
        if not r["usable"]:
            print(f"{r['kind']} key {r['fingerprint']} for {r['address']} is revoked or "
                  "unusable now: no new mail is encrypted to it")
            continue
        print(f"imported {r['kind']} key {r['fingerprint']} for {r['address']}")
        if r["changed"]:
            print(f"  note: {r['address']} already had a different key; both are kept, this "
                  "one is used for new mail, and the change is recorded in the audit log")
    return 0


def cmd_import_own(args: argparse.Namespace) -> int:
    from mailhub.crypto.keystore import import_own

    hub = hub_from(args)
    records = import_own(hub, Path(args.file), Path(args.cert) if args.cert else None)
    for r in records:
        print(f"hub key {r.kind} {r.fingerprint} ({r.address})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from mailhub.crypto.keystore import list_keys

    rows = list_keys(hub_from(args))
    if args.json:
        print_json(rows)
    else:
        print_table(rows, ["address", "kind", "fingerprint", "expires", "source", "warning"],
                    "no keys", free_text={"warning"})
    return 0


def cmd_export_hub(args: argparse.Namespace) -> int:
    hub = hub_from(args, migrate=False)
    if args.smime:
        print(hub.keys.smime_signer().cert_pem().decode(), end="")
    else:
        print(hub.keys.keyring.export_public(hub.keys.openpgp_signer().fingerprint), end="")
    return 0
