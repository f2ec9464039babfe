"""The crypto pool's batch call: outcomes in order, one bad job fails only itself."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from mailhub.crypto.engine import CryptoEngine, ProtectJob, chunk_count
from mailhub.crypto.selfsigned import generate_smime_identity
from mailhub.errors import CryptoError

HUB = "hub@medvoyage.example"
CLINIC = "records@clinic-b.example"


def message(n: int, size: int = 0) -> bytes:
    filler = "lab values and dates for the transfer\r\n" * (size // 39)
    return (f"From: Coordinator <coord@medvoyage.example>\r\nTo: <{CLINIC}>\r\n"
            f"Subject: batch {n}\r\nMessage-ID: <batch-{n}@medvoyage.example>\r\n"
            f"Content-Type: text/plain\r\n\r\nMARKER-{n} dates for the transfer\r\n"
            f"{filler}").encode()


def test_chunks_one_per_worker_and_about_a_mebibyte_at_most() -> None:
    assert chunk_count([4096] * 32, 2) == 2
    assert chunk_count([200 * 1024] * 32, 2) == 7  # 6.25 MiB
    assert chunk_count([200 * 1024], 2) == 1
    assert chunk_count([5 << 20, 100], 2) == 2  # never more chunks than messages
    assert chunk_count([100], 0) == 1  # inline


@pytest.mark.parametrize(("workers", "size"), [(0, 0), (2, 0), (2, 300 * 1024)])
def test_protect_many_keeps_order_and_isolates_failures(tmp_path: Path, workers: int,
                                                        size: int) -> None:
    hub_key, hub_cert = generate_smime_identity(HUB, "Hub")
    clinic_key, clinic_cert = generate_smime_identity(CLINIC, "Clinic B")
    good = ProtectJob("smime", signer_key_pem=hub_key, signer_cert_pem=hub_cert,
                      recipient_cert_pems=(clinic_cert, hub_cert))
    bad = ProtectJob("smime", signer_key_pem=hub_key, signer_cert_pem=hub_cert,
                     recipient_cert_pems=(b"not a certificate",))
    items = [(message(n, size), bad if n == 3 else good) for n in range(7)]  # 300 KiB: 3 chunks
    engine = CryptoEngine(workers)
    try:
        outcomes = asyncio.run(engine.protect_many(items))
    finally:
        engine.close()
    assert len(outcomes) == 7
    assert isinstance(outcomes[3], CryptoError)
    key = tmp_path / "clinic.key"
    key.write_bytes(clinic_key)
    for n, out in enumerate(outcomes):
        if n == 3:
            continue
        assert isinstance(out, bytes) and b"MARKER" not in out  # encrypted
        (tmp_path / "m.eml").write_bytes(out)
        plain = subprocess.run(["openssl", "cms", "-decrypt", "-in", str(tmp_path / "m.eml"),
                                "-inkey", str(key)], capture_output=True, timeout=60)
        assert plain.returncode == 0, plain.stderr
        # the n-th outcome is the n-th message (signed inside, so the marker is readable now)
        assert f"MARKER-{n} ".encode() in plain.stdout
        assert b"MARKER-" + str((n + 1) % 7).encode() + b" " not in plain.stdout


def test_protect_many_of_nothing() -> None:
    assert asyncio.run(CryptoEngine(0).protect_many([])) == []


def test_the_engine_keeps_protecting_after_its_worker_is_killed() -> None:
    """A worker lost to the OOM killer must not leave the hub unable to encrypt (the process
    pool it replaced stayed broken until a restart, so every later message was held)."""
    import os
    import signal

    from tests.crypto.process_watch import gone, wait_until

    hub_key, hub_cert = generate_smime_identity(HUB, "Hub")
    _, clinic_cert = generate_smime_identity(CLINIC, "Clinic B")
    job = ProtectJob("smime", signer_key_pem=hub_key, signer_cert_pem=hub_cert,
                     recipient_cert_pems=(clinic_cert, hub_cert))
    engine = CryptoEngine(1)
    try:
        pid = asyncio.run(engine.call(os.getpid))
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: gone(pid), "the worker to die")
        outcomes = asyncio.run(engine.protect_many([(message(n), job) for n in range(3)]))
        assert asyncio.run(engine.call(os.getpid)) not in (pid, os.getpid())
    finally:
        engine.close()
    assert all(isinstance(o, bytes) and b"application/pkcs7-mime" in o for o in outcomes)
