"""The inbound partner check: partners must encrypt (and sign, when required); patients need not."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailhub.errors import PolicyRefusal
from mailhub.policy.inbound import InboundDecision, ProtectionFacts, check_inbound
from mailhub.policy.rules import Policy, load_policy

HUB_FPR = "0123456789ABCDEF0123456789ABCDEF01234567"

RULES = """
[[partner]]
domain = "clinic-a.example"
require = "encrypted"
method = "openpgp"

[[partner]]
domain = "clinic-b.example"
require = "signed-and-encrypted"
method = "smime"
addresses = ["dr.kaya@freemail.example"]
"""


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    d: Path = tmp_path_factory.mktemp("rules")
    (d / "policy.toml").write_text(RULES, encoding="utf-8")
    return load_policy(d)


def check(policy: Policy, sender: str, encrypted: bool, signature: str = "none") -> InboundDecision:
    return check_inbound(sender, ProtectionFacts(encrypted, signature), policy, HUB_FPR)


def steps(d: InboundDecision) -> list[tuple[str, bool]]:
    return [(h.rule, h.hit) for h in d.trace]


def test_patient_plaintext_is_accepted(policy: Policy) -> None:
    d = check(policy, "maria@patient.example", False)
    assert d.accept and d.smtp_code == 250 and d.smtp_status.startswith("2.")
    assert steps(d) == [("partner", False)]


def test_partner_plaintext_is_refused_with_hub_key(policy: Policy) -> None:
    d = check(policy, "Records@Clinic-A.example", False)
    assert not d.accept and d.smtp_code == 550 and d.smtp_status == "5.7.1"
    assert "Encryption is required" in d.text and "clinic-a.example" in d.text
    assert HUB_FPR in d.text and "mailhub keys export-hub" in d.text and "S/MIME" in d.text
    assert d.smtp_reply().startswith("550 5.7.1 Encryption is required")
    assert "\n" not in d.smtp_reply() and "\r" not in d.smtp_reply()
    assert steps(d) == [("partner", True), ("partner-encrypted", False)]


def test_partner_subdomain_and_listed_address_are_partners(policy: Policy) -> None:
    assert not check(policy, "lab@results.clinic-a.example", False).accept
    d = check(policy, "Dr.Kaya@FreeMail.example", False)
    assert not d.accept and "clinic-b.example" in d.text
    assert check(policy, "other@freemail.example", False).accept


def test_partner_encrypted_is_accepted(policy: Policy) -> None:
    d = check(policy, "records@clinic-a.example", True, "none")
    assert d.accept and steps(d) == [("partner", True), ("partner-encrypted", True)]
    # require = "encrypted": an invalid signature is recorded, not refused
    assert check(policy, "records@clinic-a.example", True, "invalid").accept


def test_signed_and_encrypted_partner(policy: Policy) -> None:
    ok = check(policy, "records@clinic-b.example", True, "verified")
    assert ok.accept and steps(ok)[-1] == ("partner-signature", True)

    unsigned = check(policy, "records@clinic-b.example", True, "none")
    assert not unsigned.accept and unsigned.smtp_status == "5.7.1"
    assert "must be signed and encrypted" in unsigned.text and "not signed" in unsigned.text
    assert HUB_FPR in unsigned.text

    unknown = check(policy, "records@clinic-b.example", True, "unknown-key")
    assert not unknown.accept and "does not know" in unknown.text

    invalid = check(policy, "records@clinic-b.example", True, "invalid")
    assert not invalid.accept and invalid.smtp_status == "5.7.7"
    assert "does not verify" in invalid.text and HUB_FPR in invalid.text
    assert steps(invalid) == [("partner", True), ("partner-encrypted", True),
                              ("partner-signature", False)]

    plain = check(policy, "records@clinic-b.example", False, "verified")
    assert not plain.accept and "Encryption is required" in plain.text


def test_unknown_signature_value_fails_closed(policy: Policy) -> None:
    assert not check(policy, "records@clinic-b.example", True, "maybe").accept


def test_refusal_as_error(policy: Policy) -> None:
    err = check(policy, "records@clinic-b.example", True, "invalid").as_error()
    assert isinstance(err, PolicyRefusal)
    assert err.smtp_reply().startswith("550 5.7.7 The signature")


def test_empty_or_garbage_sender_is_not_a_partner(policy: Policy) -> None:
    assert check(policy, "", False).accept
    assert check(policy, "clinic-a.example", False).accept
