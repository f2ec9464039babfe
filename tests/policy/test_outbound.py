"""The outbound per-recipient decision: internal, keys, plaintext exceptions, consent, holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mailhub.policy.outbound import (
    KeyCandidate,
    OutboundDecision,
    RecipientContext,
    decide_recipient,
)
from mailhub.policy.rules import Policy, load_policy

HUB = "medvoyage.example"
FPR_PGP = "A" * 40
FPR_PGP2 = "B" * 40
FPR_SMIME = "C" * 40

RULES = """
[[partner]]
domain = "clinic-a.example"
require = "encrypted"
method = "openpgp"

[[partner]]
domain = "clinic-b.example"
require = "signed-and-encrypted"
method = "smime"

[[partner]]
domain = "clinic-c.example"
require = "encrypted"
method = "smime"
only_method = true

[[plaintext]]
address = "bookings@airline.example"
reason = "travel dates only"

[[hold]]
address = "vip@patient.example"
reason = "director reviews mail to this patient"
"""


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    d: Path = tmp_path_factory.mktemp("rules")
    (d / "policy.toml").write_text(RULES, encoding="utf-8")
    return load_policy(d)


def pgp(fpr: str = FPR_PGP, *, usable: bool = True, reason: str = "", source: str = "imported",
        prefer: bool = False) -> KeyCandidate:
    return KeyCandidate("openpgp", fpr, usable, reason, source, prefer)


def smime(fpr: str = FPR_SMIME, *, usable: bool = True, reason: str = "",
          source: str = "imported") -> KeyCandidate:
    return KeyCandidate("smime", fpr, usable, reason, source)


def decide(policy: Policy, address: str, *keys: KeyCandidate, relay: bool = False,
           consent: bool = False) -> OutboundDecision:
    return decide_recipient(RecipientContext(address, HUB, relay, tuple(keys), consent), policy)


def steps(d: OutboundDecision) -> list[tuple[str, bool]]:
    return [(h.rule, h.hit) for h in d.trace]


def test_internal_with_relay_goes_plaintext_to_internal(policy: Policy) -> None:
    d = decide(policy, "Anna@MedVoyage.Example", relay=True)
    assert (d.action, d.relay, d.method, d.require_tls) == ("plaintext", "internal", None, False)
    assert steps(d) == [("invalid-address", False), ("hold-rule", False), ("internal-relay", True)]


def test_internal_without_relay_is_not_plaintext(policy: Policy) -> None:
    held = decide(policy, "anna@medvoyage.example")
    assert held.action == "hold"
    assert ("internal-relay", False) in steps(held)
    assert "no internal relay" in held.trace[2].detail
    enc = decide(policy, "anna@medvoyage.example", pgp())
    assert (enc.action, enc.relay, enc.key_fingerprint) == ("encrypt", "smarthost", FPR_PGP)


def test_subdomain_of_hub_is_external(policy: Policy) -> None:
    d = decide(policy, "anna@eu.medvoyage.example", relay=True)
    assert d.action == "hold" and d.relay == "smarthost"
    assert ("internal-relay", False) in steps(d)


def test_usable_key_encrypts_openpgp_before_smime(policy: Policy) -> None:
    d = decide(policy, "patient@mail.example", smime(), pgp())
    assert (d.action, d.method, d.key_fingerprint) == ("encrypt", "openpgp", FPR_PGP)
    assert steps(d)[-1] == ("usable-key", True)
    assert d.require_tls is False


def test_partner_method_preference(policy: Policy) -> None:
    d = decide(policy, "records@clinic-b.example", pgp(), smime())
    assert (d.method, d.key_fingerprint) == ("smime", FPR_SMIME)
    assert "prefers smime" in d.trace[-1].detail
    # preferred kind unusable: falls back to the other kind
    d = decide(policy, "records@clinic-b.example", pgp(), smime(usable=False, reason="expired"))
    assert (d.action, d.method) == ("encrypt", "openpgp")
    # partner preferring openpgp, both known
    d = decide(policy, "records@clinic-a.example", smime(), pgp())
    assert d.method == "openpgp"


def test_only_method_partner_holds_without_that_kind(policy: Policy) -> None:
    d = decide(policy, "desk@clinic-c.example", pgp())
    assert d.action == "hold"
    assert "clinic-c.example accepts only S/MIME, but only an OpenPGP key is known" in d.reason
    assert "desk@clinic-c.example" in d.reason
    assert decide(policy, "desk@clinic-c.example", pgp(), smime()).method == "smime"


def test_imported_before_autocrypt_and_prefer_encrypt(policy: Policy) -> None:
    d = decide(policy, "p@mail.example", pgp(FPR_PGP2, source="autocrypt", prefer=True), pgp())
    assert d.key_fingerprint == FPR_PGP
    d = decide(policy, "p@mail.example", pgp(FPR_PGP2, source="autocrypt"),
               pgp(FPR_PGP, source="autocrypt", prefer=True))
    assert d.key_fingerprint == FPR_PGP
    d = decide(policy, "p@mail.example", pgp(FPR_PGP2, source="autocrypt"))
    assert (d.action, d.key_fingerprint) == ("encrypt", FPR_PGP2)


@pytest.mark.parametrize("why", ["expired", "revoked", "no encryption subkey"])
def test_unusable_key_holds_with_reason(policy: Policy, why: str) -> None:
    d = decide(policy, "Patient@Mail.Example", pgp(usable=False, reason=why))
    assert d.action == "hold" and d.method is None and d.key_fingerprint is None
    assert "patient@mail.example" in d.reason and why in d.reason and FPR_PGP in d.reason
    assert "mailhub keys import FILE" in d.reason and "sends the held message by itself" in d.reason
    assert steps(d)[-1] == ("default-hold", True)


def test_no_key_at_all(policy: Policy) -> None:
    d = decide(policy, "someone@mail.example")
    assert d.action == "hold"
    assert "no OpenPGP key or S/MIME certificate is known for someone@mail.example" in d.reason


def test_plaintext_rule_only_for_named_address(policy: Policy) -> None:
    d = decide(policy, "bookings@airline.example")
    assert (d.action, d.relay, d.require_tls) == ("plaintext", "smarthost", True)
    assert "travel dates only" in d.reason
    assert steps(d) == [("invalid-address", False), ("hold-rule", False), ("internal-relay", False),
                        ("usable-key", False), ("plaintext-rule", True)]
    # local part and domain compare case-insensitively (documented choice)
    assert decide(policy, "BOOKINGS@Airline.Example").action == "plaintext"
    for other in ("info@airline.example", "Info@AIRLINE.example", "bookings@eu.airline.example",
                  "bookings+x@airline.example", "bookings@airline.example.evil.example",
                  "xbookings@airline.example"):
        held = decide(policy, other)
        assert held.action == "hold", other
        assert ("plaintext-rule", False) in steps(held)


def test_key_wins_over_plaintext_rule(policy: Policy) -> None:
    d = decide(policy, "bookings@airline.example", pgp())
    assert d.action == "encrypt" and "plaintext-rule" not in [h.rule for h in d.trace]


def test_consent_allows_plaintext_with_tls(policy: Policy) -> None:
    d = decide(policy, "patient@mail.example", consent=True)
    assert (d.action, d.require_tls) == ("plaintext", True)
    assert steps(d)[-2:] == [("plaintext-rule", False), ("patient-consent", True)]
    held = decide(policy, "patient@mail.example", consent=False)
    assert held.action == "hold" and ("patient-consent", False) in steps(held)


def test_consent_never_for_a_partner(policy: Policy) -> None:
    d = decide(policy, "records@clinic-a.example", consent=True)
    assert d.action == "hold"
    assert ("patient-consent", False) in steps(d)
    assert "requires encryption" in d.trace[-2].detail


def test_hold_rule_wins_even_with_key(policy: Policy) -> None:
    d = decide(policy, "VIP@patient.example", pgp())
    assert d.action == "hold" and "director reviews" in d.reason
    assert steps(d) == [("invalid-address", False), ("hold-rule", True)]


@pytest.mark.parametrize("address", ["", "not-an-address", "a@b", "two words@x.example"])
def test_invalid_address_holds(policy: Policy, address: str) -> None:
    d = decide(policy, address, relay=True, consent=True)
    assert d.action == "hold" and steps(d) == [("invalid-address", True)]


def test_unknown_key_kind_is_not_used(policy: Policy) -> None:
    d = decide(policy, "p@mail.example", KeyCandidate("age", FPR_PGP, True, "", "imported"),
               KeyCandidate("openpgp", "", True, "", "imported"),
               KeyCandidate("openpgp", FPR_PGP2, True, "", "keyserver"))
    assert d.action == "hold"
    assert "unknown key kind 'age'" in d.reason and "unknown key source 'keyserver'" in d.reason


def test_fails_closed_on_unexpected_input(policy: Policy) -> None:
    ctx = RecipientContext("p@mail.example", HUB, False, None, True)  # type: ignore[arg-type]
    d = decide_recipient(ctx, policy)
    assert d.action == "hold" and d.trace[-1].rule == "error" and d.trace[-1].hit
    assert "nothing was sent" in d.reason


def test_decision_record_is_json(policy: Policy) -> None:
    d = decide(policy, "patient@mail.example", pgp())
    record = json.loads(json.dumps(d.as_record()))
    assert record["action"] == "encrypt" and record["key_fingerprint"] == FPR_PGP
    assert [t["rule"] for t in record["trace"]] == ["invalid-address", "hold-rule",
                                                    "internal-relay", "usable-key"]
    assert hash(d) == hash(decide(policy, "patient@mail.example", pgp()))
