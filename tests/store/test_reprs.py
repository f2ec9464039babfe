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
