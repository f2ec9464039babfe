"""The per-recipient outbound decision: encrypt, plaintext (narrow exceptions) or hold.

A pure function over plain data, so it runs the same in the relay, the scheduler and worker
processes, and every verdict is explained by its trace. Rules, in order; the first hit decides
and every rule looked at is recorded, hit or miss:

1. ``invalid-address``  the recipient is not a plain address -> hold.
2. ``hold-rule``        a ``[[hold]]`` entry names it -> hold (a coordinator reviews it).
3. ``internal-relay``   the address is at the hub's own domain (exactly, not a subdomain: a
                        subdomain may be another system) and an internal relay is set ->
                        plaintext to the organisation's own server.
4. ``usable-key``       a usable key -> encrypt. The partner's ``method`` first when a usable key
                        of that kind exists (only that kind when ``only_method``); otherwise
                        OpenPGP before S/MIME; imported keys before Autocrypt-learnt ones, and
                        among those a key whose owner asked for encryption (prefer-encrypt).
5. ``plaintext-rule``   a ``[[plaintext]]`` entry names exactly this address -> plaintext, TLS
                        required.
6. ``patient-consent``  the patient recorded consent to plain email -> plaintext, TLS required
                        (never for a partner's address).
7. ``default-hold``     always hits -> hold, with a reason naming the recipient, why, and what
                        to do.

Fail closed: an exception while deciding is recorded as rule ``error`` and the mail is held.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from mailhub.policy.rules import PartnerRule, Policy, normalize_domain, split_address
from mailhub.policy.trace import RuleHit, trace_to_list

log = logging.getLogger("mailhub.policy")

KINDS = ("openpgp", "smime")
SOURCES = ("imported", "autocrypt")
_KIND_NAME = {"openpgp": "OpenPGP key", "smime": "S/MIME certificate"}
_METHOD_NAME = {"openpgp": "OpenPGP", "smime": "S/MIME"}
WHAT_TO_DO = ("import the recipient's OpenPGP key or S/MIME certificate with "
              "'mailhub keys import FILE': the serving hub then sends the held message by "
              "itself ('mailhub queue release' with its id from 'mailhub queue list' does it "
              "at once)")


@dataclass(frozen=True)
class KeyCandidate:
    """A key the keyring knows for the recipient, usable or not (and why not)."""

    kind: str  # "openpgp" | "smime"
    fingerprint: str
    usable: bool
    reason: str  # "" when usable, else "expired", "revoked", "no encryption subkey", ...
    source: str  # "imported" | "autocrypt"
    prefer_encrypt: bool = False


@dataclass(frozen=True)
class RecipientContext:
    address: str
    hub_domain: str
    internal_relay_set: bool
    keys: tuple[KeyCandidate, ...]
    consent_plain_email: bool = False


@dataclass(frozen=True)
class OutboundDecision:
    action: str  # "encrypt" | "plaintext" | "hold"
    method: str | None  # "openpgp" | "smime" | None
    key_fingerprint: str | None
    relay: str  # "smarthost" | "internal"
    reason: str
    trace: tuple[RuleHit, ...]
    require_tls: bool = False

    def as_record(self) -> dict[str, Any]:
        """Plain data for the message's record (JSON-serialisable)."""
        return {"action": self.action, "method": self.method,
                "key_fingerprint": self.key_fingerprint, "relay": self.relay,
                "reason": self.reason, "require_tls": self.require_tls,
                "trace": trace_to_list(self.trace)}


def _hold(reason: str, trace: list[RuleHit]) -> OutboundDecision:
    return OutboundDecision("hold", None, None, "smarthost", reason, tuple(trace))


def _describe(k: KeyCandidate) -> str:
    name = _KIND_NAME.get(k.kind, f"key of unknown kind {k.kind!r}")
    return f"{name} {k.fingerprint or '(no fingerprint)'} ({k.source})"


def _why_unusable(k: KeyCandidate) -> str:
    if k.kind not in KINDS:
        return f"unknown key kind {k.kind!r}"
    if k.source not in SOURCES:
        return f"unknown key source {k.source!r}"
    if not k.fingerprint:
        return "no fingerprint"
    if not k.usable:
        return k.reason or "not usable"
    return ""


def _rank(k: KeyCandidate, preferred: str | None) -> tuple[int, int, int]:
    kind_rank = 0 if k.kind == preferred else 1 + KINDS.index(k.kind)
    return (kind_rank, SOURCES.index(k.source), 0 if k.prefer_encrypt else 1)


def choose_key(keys: tuple[KeyCandidate, ...], addr: str,
               partner: PartnerRule | None) -> tuple[KeyCandidate | None, str]:
    """The key to encrypt to, or None and a sentence saying why there is none."""
    usable = [k for k in keys if not _why_unusable(k)]
    preferred = partner.method if partner else None
    if partner and partner.only_method:
        allowed = [k for k in usable if k.kind == partner.method]
        if allowed:
            return min(allowed, key=lambda k: _rank(k, preferred)), ""
        if usable:
            other = _KIND_NAME[usable[0].kind]
            return None, (f"partner {partner.domain} accepts only {_METHOD_NAME[partner.method]}, "
                          f"but only an {other} is known for {addr}")
    elif usable:
        return min(usable, key=lambda k: _rank(k, preferred)), ""
    if not keys:
        return None, f"no OpenPGP key or S/MIME certificate is known for {addr}"
    bad = "; ".join(f"{_describe(k)}: {_why_unusable(k) or 'not of the required kind'}"
                    for k in keys)
    return None, f"the known keys for {addr} cannot be used: {bad}"


def decide_recipient(ctx: RecipientContext, policy: Policy) -> OutboundDecision:
    """Decide how mail to one recipient leaves the hub; anything unexpected holds it."""
    trace: list[RuleHit] = []
    try:
        return _decide(ctx, policy, trace)
    except Exception as exc:  # fail closed: a bug or odd input must never send plaintext
        log.error("policy evaluation failed for a recipient, holding: %s", type(exc).__name__)
        trace.append(RuleHit("error", True, f"{type(exc).__name__}: {exc}"))
        return _hold(f"held: the policy could not be evaluated for {ctx.address!r} "
                     f"({type(exc).__name__}); nothing was sent. Check the rules and the key for "
                     f"this recipient, then 'mailhub queue release' with its id from 'mailhub queue "
                     "list'", trace)


def _decide(ctx: RecipientContext, policy: Policy, trace: list[RuleHit]) -> OutboundDecision:
    parts = split_address(ctx.address)
    if parts is None:
        trace.append(RuleHit("invalid-address", True, f"{ctx.address!r} is not a mail address"))
        return _hold(f"held: recipient {ctx.address!r} is not a valid mail address; correct the "
                     "address and send the message again", trace)
    addr = f"{parts[0]}@{parts[1]}"
    trace.append(RuleHit("invalid-address", False, addr))

    hold = policy.hold_for(addr)
    if hold is not None:
        why = hold.reason or "no reason given"
        trace.append(RuleHit("hold-rule", True, f"{hold.source}: {why}"))
        return _hold(f"held for {addr} by a [[hold]] rule ({hold.source}: {why}); a coordinator "
                     "checks it and sends it with 'mailhub queue release' (its id is in 'mailhub queue "
                     "list')", trace)
    trace.append(RuleHit("hold-rule", False, "no [[hold]] entry names it"))

    hub = normalize_domain(ctx.hub_domain)
    if parts[1] == hub and ctx.internal_relay_set:
        trace.append(RuleHit("internal-relay", True, f"{addr} is at {hub}; to the internal relay"))
        return OutboundDecision("plaintext", None, None, "internal",
                                f"{addr} is internal ({hub}): to the organisation's own server",
                                tuple(trace))
    trace.append(RuleHit("internal-relay", False,
                         f"at {hub} but no internal relay is configured" if parts[1] == hub
                         else f"not at {hub}"))

    partner = policy.partner_for(addr)
    key, why_not = choose_key(tuple(ctx.keys), addr, partner)
    if key is not None:
        pref = f"; partner {partner.domain} prefers {partner.method}" if partner else ""
        trace.append(RuleHit("usable-key", True, f"{_describe(key)}{pref}"))
        return OutboundDecision("encrypt", key.kind, key.fingerprint, "smarthost",
                                f"encrypted to {addr} with {_describe(key)}", tuple(trace))
    trace.append(RuleHit("usable-key", False, why_not))

    if partner is not None:
        detail = f"{addr} belongs to partner {partner.domain}, which requires encryption"
        trace.append(RuleHit("plaintext-rule", False, detail))
        trace.append(RuleHit("patient-consent", False, detail))
    else:
        plain = policy.plaintext_for(addr)
        if plain is not None:
            why = f"{plain.source}" + (f": {plain.reason}" if plain.reason else "")
            trace.append(RuleHit("plaintext-rule", True, why))
            return OutboundDecision("plaintext", None, None, "smarthost",
                                    f"plaintext to {addr} allowed by {why} (TLS required)",
                                    tuple(trace), require_tls=True)
        trace.append(RuleHit("plaintext-rule", False, "no [[plaintext]] entry names it"))
        if ctx.consent_plain_email:
            trace.append(RuleHit("patient-consent", True, "patient consented to plain email"))
            return OutboundDecision("plaintext", None, None, "smarthost",
                                    f"plaintext to {addr}: the patient consented to plain email "
                                    "(TLS required)", tuple(trace), require_tls=True)
        trace.append(RuleHit("patient-consent", False, "no recorded consent to plain email"))

    trace.append(RuleHit("default-hold", True, why_not))
    return _hold(f"held: {why_not}. To send it encrypted, {WHAT_TO_DO}", trace)
