"""Policy as data: the TOML files directly in ``rules/`` read into typed, frozen rule tables.

Only ``*.toml`` files directly in the rules folder are read here (``care-plans/`` belongs to the
scheduler). Tables understood, each an array of tables (``[[name]]``):

``[[partner]]``   a clinic whose case mail must be encrypted, both ways.
    ``domain``     the partner's mail domain; it also covers its subdomains (the most specific
                   partner wins), so a clinic's ``lab.`` host cannot slip plaintext past.
    ``require``    ``"encrypted"`` | ``"signed-and-encrypted"`` (what inbound mail must be).
    ``method``     ``"openpgp"`` | ``"smime"``: preferred method for mail sent to it.
    ``addresses``  optional list of exact addresses outside ``domain`` that also belong to this
                   partner (a doctor's own mailbox); they get the same treatment.
    ``only_method`` optional bool (default false): send to it with ``method`` only; hold when
                   only a key of the other kind is known.
``[[plaintext]]`` an explicit, narrow exception to encryption (TLS is still required).
    ``address``    one exact address; no wildcards, no bare domains: a rule that allows
                   plaintext names its recipients explicitly. Never at a partner's domain.
    ``reason``     optional free text recorded in the decision trace.
``[[hold]]``      recipients whose mail always waits for a coordinator, even with a key.
    ``address`` or ``domain`` (exactly one; a domain covers its subdomains), ``reason`` text.

Addresses compare case-insensitively, local part included: RFC 5321 allows case-sensitive
local parts, but no mail system in use treats ``Bookings@`` and ``bookings@`` as different
people, and a case-sensitive match would only let a case variant fall through to a hold.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from mailhub.errors import RuleError

log = logging.getLogger("mailhub.policy")

REQUIRES = ("encrypted", "signed-and-encrypted")
METHODS = ("openpgp", "smime")

_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}$")
_DOT_ATOM = re.compile(r"^[a-z0-9!#$%&'+\-/=^_`{|}~]+(\.[a-z0-9!#$%&'+\-/=^_`{|}~]+)*$")
_WILDCARD = re.compile(r"[*?\[\]]")


def normalize_domain(domain: str) -> str:
    """Lower-case a domain and drop a trailing root dot."""
    return domain.strip().lower().rstrip(".")


def split_address(address: str) -> tuple[str, str] | None:
    """Return (local, domain), both lower-cased, or None when it is not a plain address.

    Surrounding angle brackets are dropped and a quoted local part that is a plain dot-atom is
    unquoted (``"bob"@x`` is ``bob@x``, as RFC 5322 says). Every rule looks at every recipient,
    and the same few recur: short strings' answers are cached.
    """
    if len(address) > 640:
        return _split_address.__wrapped__(address)
    return _split_address(address)


@functools.lru_cache(maxsize=4096)
def _split_address(address: str) -> tuple[str, str] | None:
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain:
        return None
    local = local.lower()
    if len(local) > 2 and local[0] == local[-1] == '"' and _DOT_ATOM.match(local[1:-1]):
        local = local[1:-1]
    domain = normalize_domain(domain)
    if not _DOMAIN.match(domain) or any(c.isspace() or ord(c) < 32 for c in local):
        return None
    return local, domain


def normalize_address(address: str) -> str | None:
    """The address in the one form rules compare on, or None when it is not an address."""
    parts = split_address(address)
    return f"{parts[0]}@{parts[1]}" if parts else None


def domain_and_parents(domain: str) -> list[str]:
    """``a.b.example`` -> [``a.b.example``, ``b.example``, ``example``]: most specific first."""
    labels = domain.split(".")
    return [".".join(labels[i:]) for i in range(len(labels))]


@dataclass(frozen=True)
class PartnerRule:
    domain: str
    require: str
    method: str
    addresses: tuple[str, ...] = ()
    only_method: bool = False
    source: str = ""


@dataclass(frozen=True)
class PlaintextRule:
    address: str
    reason: str = ""
    source: str = ""


@dataclass(frozen=True)
class HoldRule:
    address: str = ""
    domain: str = ""
    reason: str = ""
    source: str = ""


@dataclass(frozen=True)
class Policy:
    """All rule tables; frozen, hashable and picklable so worker processes can take a copy."""

    partners: tuple[PartnerRule, ...] = ()
    plaintext: tuple[PlaintextRule, ...] = ()
    holds: tuple[HoldRule, ...] = ()
    files: tuple[str, ...] = ()

    def partner_for(self, address: str) -> PartnerRule | None:
        """The partner an address belongs to (its own address list first, then its domain)."""
        parts = split_address(address)
        if parts is None:
            return None
        norm = f"{parts[0]}@{parts[1]}"
        for p in self.partners:
            if norm in p.addresses:
                return p
        by_domain = {p.domain: p for p in self.partners}
        for d in domain_and_parents(parts[1]):
            if d in by_domain:
                return by_domain[d]
        return None

    def plaintext_for(self, address: str) -> PlaintextRule | None:
        norm = normalize_address(address)
        return next((r for r in self.plaintext if r.address == norm), None) if norm else None

    def hold_for(self, address: str) -> HoldRule | None:
        parts = split_address(address)
        if parts is None:
            return None
        norm = f"{parts[0]}@{parts[1]}"
        domains = set(domain_and_parents(parts[1]))
        for r in self.holds:
            if (r.address and r.address == norm) or (r.domain and r.domain in domains):
                return r
        return None


_HOW = "see the README section 'Rules' for the format"
_TABLES: dict[str, tuple[set[str], set[str]]] = {  # table -> (required keys, optional keys)
    "partner": ({"domain", "require", "method"}, {"addresses", "only_method"}),
    "plaintext": ({"address"}, {"reason"}),
    "hold": (set(), {"address", "domain", "reason"}),
}


class _Entry:
    """One ``[[table]]`` entry with errors that name the file, the table and the index."""

    def __init__(self, path: Path, table: str, index: int, data: Any) -> None:
        self.where = f"[[{table}]] entry {index + 1}"
        self.source = f"{path.name}: {self.where}"
        self.path = path
        if not isinstance(data, dict):
            self.fail(f"must be a table, e.g. [[{table}]] followed by key = value lines")
        required, optional = _TABLES[table]
        unknown = sorted(set(data) - required - optional)
        if unknown:
            self.fail(f"unknown key(s) {', '.join(unknown)}",
                      f"[[{table}]] takes: {', '.join(sorted(required | optional))}")
        missing = sorted(required - set(data))
        if missing:
            self.fail(f"missing key(s) {', '.join(missing)}",
                      f"add them; [[{table}]] needs: {', '.join(sorted(required))}")
        self.data = data

    def fail(self, problem: str, hint: str = _HOW) -> NoReturn:
        raise RuleError(f"{self.path}: {self.where}: {problem}", hint=hint)

    def text(self, key: str, default: str | None = None) -> str:
        value = self.data.get(key, default)
        if not isinstance(value, str):
            self.fail(f"{key} must be a quoted string, not {value!r}")
        return value.strip()

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        value = self.text(key)
        if value not in choices:
            self.fail(f"{key} = {value!r} is not allowed",
                      f"use one of: {', '.join(repr(c) for c in choices)}")
        return value

    def domain(self, key: str = "domain") -> str:
        value = normalize_domain(self.text(key))
        if _WILDCARD.search(value) or value.startswith("@") or not _DOMAIN.match(value):
            self.fail(f"{key} = {value!r} is not a mail domain",
                      'write the bare domain, e.g. domain = "clinic-a.example" (it covers subdomains)')
        return value

    def address(self, value: Any, key: str = "address") -> str:
        if not isinstance(value, str):
            self.fail(f"{key} must be a quoted string, not {value!r}")
        raw = value.strip()
        if _WILDCARD.search(raw) or raw.startswith("@") or "@" not in raw:
            self.fail(f"{key} = {raw!r} is not one exact address (wildcards and bare domains are "
                      "not allowed)", "name each recipient, e.g. address = \"bookings@airline.example\"")
        parts = split_address(raw)
        if parts is None or not _DOT_ATOM.match(parts[0]):
            self.fail(f"{key} = {raw!r} is not a mail address", 'e.g. "bookings@airline.example"')
        return f"{parts[0]}@{parts[1]}"


def _read_file(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RuleError(f"{path}: not valid TOML: {exc}", hint="fix the syntax at that line") from exc
    except UnicodeDecodeError as exc:
        raise RuleError(f"{path}: not UTF-8 text", hint="save the file as UTF-8") from exc
    except OSError as exc:
        raise RuleError(f"{path}: cannot be read: {exc.strerror}") from exc


def rule_files(rules_dir: Path | str) -> list[Path]:
    """The ``*.toml`` files directly in the rules folder, in name order (care-plans/ excluded)."""
    base = Path(rules_dir)
    if not base.is_dir():
        raise RuleError(f"rules folder {base} does not exist",
                        hint="create it (mailhub init copies the default rules) or fix [hub].rules_dir")
    return sorted(p for p in base.iterdir() if p.suffix == ".toml" and p.is_file())


def _parse_entries(path: Path, raw: dict[str, Any]) -> tuple[list[PartnerRule], list[PlaintextRule], list[HoldRule]]:
    partners: list[PartnerRule] = []
    plain: list[PlaintextRule] = []
    holds: list[HoldRule] = []
    for table, entries in raw.items():
        if table not in _TABLES:
            raise RuleError(f"{path}: unknown table [{table}]",
                            hint=f"rule files take [[partner]], [[plaintext]] and [[hold]]; {_HOW}")
        if not isinstance(entries, list):
            raise RuleError(f"{path}: [{table}] must be written [[{table}]] (an array of tables)",
                            hint=f"use double brackets: [[{table}]]")
        for i, data in enumerate(entries):
            e = _Entry(path, table, i, data)
            src = e.source
            if table == "partner":
                addrs = e.data.get("addresses", [])
                if not isinstance(addrs, list):
                    e.fail("addresses must be a list of addresses", 'e.g. addresses = ["dr.a@mail.example"]')
                only = e.data.get("only_method", False)
                if not isinstance(only, bool):
                    e.fail(f"only_method must be true or false, not {only!r}")
                partners.append(PartnerRule(
                    domain=e.domain(), require=e.choice("require", REQUIRES),
                    method=e.choice("method", METHODS),
                    addresses=tuple(e.address(a, "addresses") for a in addrs),
                    only_method=only, source=src))
            elif table == "plaintext":
                plain.append(PlaintextRule(address=e.address(e.data["address"]),
                                           reason=e.text("reason", ""), source=src))
            else:
                if ("address" in e.data) == ("domain" in e.data):
                    e.fail("needs exactly one of address or domain",
                           'e.g. address = "vip@patient.example" or domain = "partner.example"')
                holds.append(HoldRule(
                    address=e.address(e.data["address"]) if "address" in e.data else "",
                    domain=e.domain() if "domain" in e.data else "",
                    reason=e.text("reason", ""), source=src))
    return partners, plain, holds


def _check_conflicts(partners: list[PartnerRule], plain: list[PlaintextRule], holds: list[HoldRule],
                     paths: dict[str, Path]) -> None:
    def fail(src: str, problem: str, hint: str) -> NoReturn:
        raise RuleError(f"{paths[src].parent / src}: {problem}", hint=hint)

    seen: dict[str, str] = {}
    for p in partners:
        for key in (p.domain, *p.addresses):
            if key in seen:
                fail(p.source, f"{key} is already a partner ({seen[key]})", "keep one entry for it")
            seen[key] = p.source
    tmp = Policy(partners=tuple(partners))
    seen_plain: dict[str, str] = {}
    for r in plain:
        if r.address in seen_plain:
            fail(r.source, f"duplicate plaintext address {r.address} (also {seen_plain[r.address]})",
                 "remove one of the two entries")
        seen_plain[r.address] = r.source
        partner = tmp.partner_for(r.address)
        if partner is not None:
            fail(r.source, f"{r.address} belongs to partner {partner.domain} ({partner.source}), "
                 "which requires encryption", "remove the plaintext exception, or the partner")
    seen_hold: dict[str, str] = {}
    for h in holds:
        key = h.address or f"domain {h.domain}"
        if key in seen_hold:
            fail(h.source, f"duplicate hold for {key} (also {seen_hold[key]})", "remove one of them")
        seen_hold[key] = h.source


def load_policy(rules_dir: Path | str) -> Policy:
    """Read and validate every rule file; raise RuleError naming file, table and entry."""
    partners: list[PartnerRule] = []
    plain: list[PlaintextRule] = []
    holds: list[HoldRule] = []
    paths: dict[str, Path] = {}
    files = rule_files(rules_dir)
    for path in files:
        p, t, h = _parse_entries(path, _read_file(path))
        for rule in (*p, *t, *h):
            paths[rule.source] = path
        partners += p
        plain += t
        holds += h
    _check_conflicts(partners, plain, holds, paths)
    return Policy(partners=tuple(partners), plaintext=tuple(plain), holds=tuple(holds),
                  files=tuple(p.name for p in files))


@dataclass
class PolicyCache:
    """The current policy, re-read when a rule file is added, removed or changed.

    ``current()`` costs one directory scan and a stat per file. When a changed file is invalid
    the last valid policy stays in force (logged, kept in ``last_error``) until it is fixed;
    the first load raises, so the hub never starts without a valid policy.
    """

    rules_dir: Path
    check_every: float = 0.0  # seconds between directory scans (the serving hub uses 1 s)
    last_error: RuleError | None = None
    _checked: float = field(default=0.0, repr=False)
    _policy: Policy | None = field(default=None, repr=False)
    _stamp: tuple[tuple[str, int, int, int], ...] | None = field(default=None, repr=False)
    _failed_stamp: tuple[tuple[str, int, int, int], ...] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.rules_dir = Path(self.rules_dir)

    def _scan(self) -> tuple[tuple[str, int, int, int], ...]:
        stamp = []
        try:
            with os.scandir(self.rules_dir) as it:
                for entry in it:
                    if entry.name.endswith(".toml") and entry.is_file():
                        st = entry.stat()
                        stamp.append((entry.name, st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            return ()
        return tuple(sorted(stamp))

    def current(self) -> Policy:
        """The policy in force now; reloads first when the files changed."""
        with self._lock:
            now = time.monotonic()
            if self._policy is not None and now - self._checked < self.check_every:
                return self._policy
            self._checked = now
            stamp = self._scan()
            if self._policy is not None and stamp in (self._stamp, self._failed_stamp):
                return self._policy
            try:
                policy = load_policy(self.rules_dir)
            except RuleError as exc:
                if self._policy is None:
                    raise
                self.last_error, self._failed_stamp = exc, stamp
                log.error("rules not reloaded, previous policy stays in force: %s", exc)
                return self._policy
            if self._policy is not None:
                log.info("rules reloaded from %s (%d files)", self.rules_dir, len(policy.files))
            self._policy, self._stamp = policy, stamp
            self._failed_stamp, self.last_error = None, None
            return policy
