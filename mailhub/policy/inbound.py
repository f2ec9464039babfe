"""The inbound partner check: a clinic that must encrypt is refused when it does not.

Pure: the listener passes the sender and what decryption/verification found, and gets back
whether to accept and, if not, the SMTP enhanced status and a text for the sending clinic that
says what is required and where to get the hub's key. Mail from anyone who is not a partner
(patients) is accepted, encrypted or not; its protection is recorded, not enforced.

Rules, in order, each recorded in the trace:

1. ``partner``            the sender belongs to a ``[[partner]]`` (miss: accept).
2. ``partner-encrypted``  the message was encrypted (miss: refuse 5.7.1).
3. ``partner-signature``  only for ``require = "signed-and-encrypted"``: the signature verified
                          (miss: refuse, 5.7.7 for an invalid signature, else 5.7.1).

Status codes (RFC 3463): 5.7.1 "delivery not authorized, message refused" for missing
protection; 5.7.7 "message integrity failure" for a signature that does not verify.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailhub.errors import PolicyRefusal
from mailhub.policy.rules import Policy, normalize_address
from mailhub.policy.trace import RuleHit

SIGNATURES = ("verified", "invalid", "unknown-key", "none")


@dataclass(frozen=True)
class ProtectionFacts:
    encrypted: bool
    signature: str  # "verified" | "invalid" | "unknown-key" | "none"


@dataclass(frozen=True)
class InboundDecision:
    accept: bool
    smtp_status: str  # "2.0.0" when accepted, "5.7.x" when refused
    text: str
    trace: tuple[RuleHit, ...]

    @property
    def smtp_code(self) -> int:
        return 250 if self.accept else 550

    def smtp_reply(self) -> str:
        """The whole reply line, e.g. ``550 5.7.1 Encryption is required ...``."""
        return f"{self.smtp_code} {self.smtp_status} {self.text}"

    def as_error(self) -> PolicyRefusal:
        """The refusal as the hub's error type, for code that raises at the SMTP edge."""
        return PolicyRefusal(self.text, status=self.smtp_status)


def where_to_get_key(hub_fingerprint: str) -> str:
    """The sentence telling a clinic which key to encrypt to and how to obtain it."""
    fpr = "".join(hub_fingerprint.split()).upper()
    pgp = (f"the hub's OpenPGP key, fingerprint {fpr}" if fpr else "the hub's OpenPGP key")
    return (f"Encrypt to {pgp} (its administrator prints it with 'mailhub keys export-hub'), "
            "or to the hub's S/MIME certificate ('mailhub keys export-hub --smime'); ask your "
            "coordinator for either.")


def check_inbound(from_addr: str, protection: ProtectionFacts, policy: Policy,
                  hub_fingerprint: str) -> InboundDecision:
    """Accept or refuse an inbound message by its sender's partner rule and its protection."""
    trace: list[RuleHit] = []
    sender = normalize_address(from_addr or "")
    partner = policy.partner_for(sender) if sender else None
    if partner is None:
        trace.append(RuleHit("partner", False, f"{sender or from_addr!r} is not a partner"))
        return InboundDecision(True, "2.0.0", "accepted", tuple(trace))
    trace.append(RuleHit("partner", True, f"{partner.domain} requires {partner.require} "
                         f"({partner.source})"))
    how = where_to_get_key(hub_fingerprint)

    if not protection.encrypted:
        trace.append(RuleHit("partner-encrypted", False, "message was not encrypted"))
        return InboundDecision(
            False, "5.7.1",
            f"Encryption is required for case mail from {partner.domain}: this message was "
            f"not encrypted and was not accepted. {how} Then send it again.", tuple(trace))
    trace.append(RuleHit("partner-encrypted", True, "message was encrypted"))

    if partner.require != "signed-and-encrypted":
        return InboundDecision(True, "2.0.0", "accepted", tuple(trace))
    sig = protection.signature if protection.signature in SIGNATURES else "none"
    if sig == "verified":
        trace.append(RuleHit("partner-signature", True, "signature verified"))
        return InboundDecision(True, "2.0.0", "accepted", tuple(trace))
    trace.append(RuleHit("partner-signature", False, f"signature: {protection.signature}"))
    if sig == "invalid":
        return InboundDecision(
            False, "5.7.7",
            f"The signature on this message from {partner.domain} does not verify (it was "
            "changed in transit or signed with another key), so it was not accepted. Sign and "
            f"encrypt it again. {how}", tuple(trace))
    if sig == "unknown-key":
        why = ("it is signed with a key the hub does not know. Send your clinic's public key "
               "(OpenPGP key or S/MIME certificate) to your coordinator to have it imported, "
               "then send the message again.")
    else:
        why = "it is not signed. Sign it with your clinic's key and send it again."
    return InboundDecision(
        False, "5.7.1",
        f"Case mail from {partner.domain} must be signed and encrypted; this message was not "
        f"accepted because {why} {how}", tuple(trace))
