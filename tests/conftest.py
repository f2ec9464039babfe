"""Shared fixtures: real loopback SMTP servers on free ports, throwaway hub instances.

Every hub instance is made by the real ``mailhub init`` (fresh keys: no key is ever committed),
in a short temporary path so gpg's agent socket path stays within the kernel's limit.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes


@dataclass
class SinkHandler:
    """A real SMTP server's handler that keeps what it receives (the smarthost in tests)."""

    messages: list[Received] = field(default_factory=list)
    refuse: dict[str, str] = field(default_factory=dict)  # recipient -> reply
    cond: threading.Condition = field(default_factory=threading.Condition)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.cond:
            self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                          envelope.original_content))
            self.cond.notify_all()
        return "250 OK"

    def wait_for(self, count: int, timeout: float = 60) -> list[Received]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.messages) >= count, timeout=timeout)
            return list(self.messages)


@pytest.fixture
def sink() -> Iterator[tuple[SinkHandler, int]]:
    handler = SinkHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mh", dir="/tmp"))
    try:
        yield path
    finally:
        from mailhub.crypto.openpgp_ops import kill_agent

        for home in path.rglob("gnupg"):
            kill_agent(str(home))
        shutil.rmtree(path, ignore_errors=True)


def set_config(cfg_path: Path, **values: str) -> None:
    """Replace `key = ...` lines (first occurrence after the given [section])."""
    text = cfg_path.read_text()
    for dotted, value in values.items():
        section, key = dotted.rsplit(".", 1)
        start = text.index(f"[{section}]")
        m = re.compile(rf"^{key} = .*$", re.M).search(text, start)
        assert m, dotted
        text = text[: m.start()] + f"{key} = {value}" + text[m.end():]
    cfg_path.write_text(text)


@dataclass
class Instance:
    root: Path
    config: Path
    submission_port: int
    inbound_port: int

    def run(self, *args: str) -> tuple[int, str, str]:
        import subprocess
        import sys

        proc = subprocess.run([sys.executable, "-m", "mailhub", "--config", str(self.config), *args],
                              capture_output=True, text=True, timeout=120)
        return proc.returncode, proc.stdout, proc.stderr


def make_instance(root: Path, smarthost_port: int, **overrides: str) -> Instance:
    from mailhub.cli.main import main

    assert main(["init", str(root)]) == 0
    cfg = root / "config.toml"
    sub, inb = free_port(), free_port()
    values = {
        "smtp.submission.listen": f'"127.0.0.1:{sub}"',
        "smtp.inbound.listen": f'"127.0.0.1:{inb}"',
        "delivery.smarthost": f'"127.0.0.1:{smarthost_port}"',
        "delivery.retry_initial": "1",
        "delivery.retry_max": "2",
    }
    values.update(overrides)
    set_config(cfg, **values)
    return Instance(root, cfg, sub, inb)


@pytest.fixture
def instance(short_tmp: Path, sink: tuple[SinkHandler, int]) -> Instance:
    return make_instance(short_tmp / "hub", sink[1])


class RunningHub:
    """A serving hub on its own event loop in a thread (as `mailhub serve` runs it)."""

    def __init__(self, config: Path, crypto_workers: int = 0) -> None:
        from mailhub.app import Hub
        from mailhub.config import load_config
        from mailhub.runner import build_server

        self.hub = Hub(load_config(config))
        self.loop = asyncio.new_event_loop()
        self.server = None
        self._crypto_workers = crypto_workers
        self._build = build_server
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> RunningHub:
        self.thread.start()

        async def boot() -> Any:
            server = self._build(self.hub, crypto_workers=self._crypto_workers)
            await server.start()
            return server

        self.server = asyncio.run_coroutine_threadsafe(boot(), self.loop).result(60)
        return self

    def stop(self) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(60)
        # as asyncio.run does at its end: cancel what is left (a client's session still open)
        # and let it finish, or it is destroyed pending and logged in some later test
        asyncio.run_coroutine_threadsafe(_cancel_the_rest(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def _cancel_the_rest() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
def running(instance: Instance) -> Iterator[RunningHub]:
    hub = RunningHub(instance.config).start()
    try:
        yield hub
    finally:
        hub.stop()


def agents_of(home: Path) -> list[int]:
    """The pids of gpg-agents running for a GNUPGHOME (from their command lines)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"gpg-agent") and str(home).encode() in argv:
            found.append(int(pid))
    return found
