"""Secrets and sealed data never show in reprs (logs, tracebacks)."""

from mailhub.ingress.auth import hash_password, verify_password
from mailhub.store.models import Payload, User


def test_password_hash_and_payload_hidden_in_repr() -> None:
    stored = hash_password("s3cret-pass")
    user = User(email="a@medvoyage.example", password_hash=stored)
    assert stored not in repr(user) and "scrypt" not in repr(user)
    assert "xyzzy" not in repr(Payload(sealed=b"xyzzy"))


def test_scrypt_hash_verifies_and_is_salted() -> None:
    a, b = hash_password("pw-123456"), hash_password("pw-123456")
    assert a != b and a.startswith("scrypt$")
    assert verify_password("pw-123456", a) and not verify_password("pw-1234567", a)
    assert not verify_password("pw-123456", "garbage")


def test_messages_and_private_keys_hidden_in_reprs() -> None:
    """What the relay carries around: a repr in a log line or a traceback shows no message
    content, no private key and no database password."""
    from pathlib import Path

    from mailhub.config import HubConfig
    from mailhub.crypto.engine import ProtectJob
    from mailhub.deliver.fresh import Opened
    from mailhub.outbound.pipeline import Prepared
    from mailhub.outbound.queueing import RowSpec
    from mailhub.scheduler.sender import StepMessage
    from mailhub.spool.spool import Envelope, SpooledMessage

    body = b"Subject: biopsy result\r\n\r\nmalignant"
    key = b"-----BEGIN PRIVATE KEY-----\nMIIEvQ"
    shown = [
        ProtectJob("smime", signer_key_pem=key, signer_cert_pem=b"cert"),
        SpooledMessage("s1", Envelope("a@medvoyage.example", ["b@x.example"], "submission"),
                       body),
        Prepared("s1", body, "<m@x>", "a@medvoyage.example", set(), {},
                 outputs={"b@x.example": body}),
        RowSpec("b@x.example", "held", "", "smarthost", body),
        StepMessage("a@medvoyage.example", "p@x.example", body, "<m@x>", "v1", "en"),
        Opened(body),
        HubConfig(domain="medvoyage.example", data_dir=Path("var"),
                  database_url="postgresql+psycopg://hub:pg-pass-42@db/hub",
                  keys_dir=Path("keys"), rules_dir=Path("rules"),
                  templates_dir=Path("templates")),
    ]
    for obj in shown:
        text = repr(obj)
        for secret in ("biopsy", "malignant", "PRIVATE KEY", "pg-pass-42"):
            assert secret not in text, (type(obj).__name__, text)
    assert "b@x.example" in repr(shown[3])  # the rest is still there to debug with
