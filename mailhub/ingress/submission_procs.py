"""The submission port served by child processes, and the pieces both modes share.

With more than one core, ``mailhub serve`` hands the submission socket to child processes so that
SMTP parsing, TLS and the spool fsync use another core than the pipeline and delivery (one event
loop, one GIL, cannot). A child answers 250 only after the spool fsync, exactly as in one process,
and passes the spool id to the parent over a pipe.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import socket
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

from mailhub import logging_setup
from mailhub.app import Hub
from mailhub.errors import MailhubError
from mailhub.ingress.auth import FailureThrottle, verify_password
from mailhub.ingress.handlers import SubmissionHandler
from mailhub.ingress.shared_throttle import FailureTable, SharedFailureThrottle
from mailhub.ingress.smtp_limits import ConnectionLimits, listener_limits
from mailhub.ingress.smtp_server import HubSMTP, make_authenticator, server_tls_context

log = logging.getLogger("mailhub.smtp")


def check_user(hub: Hub, login: str, password: str) -> bool:
    from sqlmodel import Session, select

    from mailhub.store.models import User

    with Session(hub.engine) as session:
        user = session.exec(select(User).where(User.email == login.lower())).first()
    return bool(user and not user.disabled and verify_password(password, user.password_hash))


def submission_protocol(hub: Hub, handler: SubmissionHandler, throttle: FailureThrottle,
                        tls: ssl.SSLContext, authenticator: Any,
                        limits: ConnectionLimits | None = None) -> HubSMTP:
    cfg = hub.config
    return HubSMTP(handler, throttle=throttle, limits=limits, hostname=cfg.hub.domain,
                   ident="mailhub ESMTP",
                   tls_context=tls, require_starttls=False, auth_required=True,
                   auth_require_tls=cfg.submission.require_tls_for_auth,
                   authenticator=authenticator, data_size_limit=cfg.submission.max_message_size,
                   enable_SMTPUTF8=True, decode_data=False)


class SubmissionProcesses:
    """Child processes serving the submission port, so SMTP parsing, TLS and the spool fsync use
    another core than the pipeline and delivery (one event loop, one GIL, cannot).

    The parent opens the listening socket and hands it to every child; a child answers 250 only
    after the spool fsync, as in one process, then sends the spool id back over a pipe. A child
    exits when the parent's end of its pipe closes (a crash of the parent included): spooled
    files are found at the next start. A child that dies is replaced. AUTH failures are counted
    in a table all children share (``shared_throttle.py``). Spool ids come back in batches: ``("spooled", [(listener, spool_id)...])``.
    """

    def __init__(self, hub: Hub, count: int) -> None:
        self.hub = hub
        self.count = count
        self.sock: socket.socket | None = None
        self.children: dict[int, tuple[multiprocessing.process.BaseProcess, Connection]] = {}
        self._stopping = False
        # AUTH failures counted once for all children (a client's connections land anywhere)
        self.failures = FailureTable.create(multiprocessing.get_context("spawn"))

    async def start(self, on_spooled: Callable[[str, str], None]) -> None:
        listen = self.hub.config.submission.listen
        self.sock = socket.create_server((listen.host, listen.port), backlog=1024)
        self._on_spooled = on_spooled
        self._loop = asyncio.get_running_loop()
        ready = [self._spawn() for _ in range(self.count)]
        await asyncio.wait_for(asyncio.gather(*ready), timeout=120)

    def _spawn(self) -> asyncio.Future[None]:
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=_submission_child,
                           args=(self.hub.config, self.sock, theirs, self.failures),
                           name="mailhub-submission", daemon=True)
        proc.start()
        theirs.close()
        ready: asyncio.Future[None] = self._loop.create_future()
        self.children[ours.fileno()] = (proc, ours)
        self._loop.add_reader(ours.fileno(), self._read, ours, ready)
        return ready

    def _read(self, conn: Connection, ready: asyncio.Future[None]) -> None:
        try:
            while conn.poll():
                kind, value = conn.recv()
                if kind == "ready" and not ready.done():
                    ready.set_result(None)
                elif kind == "spooled":
                    for listener, spool_id in value:
                        self._on_spooled(listener, spool_id)
                elif kind != "ready":
                    self._on_spooled(kind, value)
        except (EOFError, OSError):
            self._loop.remove_reader(conn.fileno())
            proc, _ = self.children.pop(conn.fileno())
            conn.close()
            if not ready.done():
                ready.set_exception(MailhubError(
                    "a submission listener process failed to start",
                    hint="see the log lines above; 'mailhub --debug serve' shows more"))
            elif not self._stopping:
                log.error("submission process %s exited (code %s); starting another", proc.pid,
                          proc.exitcode)
                self._spawn()

    def stop(self) -> None:
        """Ask the children to stop (blocking: run in a thread)."""
        self._stopping = True
        for proc, conn in list(self.children.values()):
            try:
                conn.send(("stop", ""))
            except OSError:
                pass
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
        if self.sock is not None:
            self.sock.close()


def _submission_child(config: Any, sock: socket.socket, conn: Connection,
                      failures: FailureTable) -> None:
    """A submission process's main (spawned: nothing is inherited but the socket, the pipe
    and the shared AUTH failure table)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    child_logging(config.log_level)
    asyncio.run(_serve_submission(Hub(config), sock, conn, failures))


def child_logging(level: str) -> None:
    """Log as ``mailhub serve`` does in the parent (a spawned child inherits none of it)."""
    logging_setup.configure(level)


async def _serve_submission(hub: Hub, sock: socket.socket, conn: Connection,
                            failures: FailureTable) -> None:
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=32, thread_name_prefix="mailhub-io"))
    done = asyncio.Event()

    def on_parent() -> None:
        try:
            conn.recv()
        except (EOFError, OSError):
            pass
        done.set()

    pending: list[tuple[str, str]] = []

    def send_spooled() -> None:
        batch = pending[:]
        pending.clear()
        try:
            conn.send(("spooled", batch))
        except OSError:  # the parent is gone; the messages wait in the spool for the next start
            done.set()

    def on_spooled(listener: str, spool_id: str) -> None:
        # sessions whose spool writes were synced together finish in the same loop pass:
        # one pipe message for all of them (a write and an unpickle each side less)
        if not pending:
            loop.call_soon(send_spooled)
        pending.append((listener, spool_id))

    cfg = hub.config
    throttle = SharedFailureThrottle(free_failures=cfg.submission.auth_failures_before_delay,
                                     table=failures)
    tls = server_tls_context(str(hub.keys.tls_cert), str(hub.keys.tls_key))
    authenticator = make_authenticator(lambda login, pw: check_user(hub, login, pw), throttle)
    handler = SubmissionHandler(domain=cfg.hub.domain, spool=hub.spool, on_spooled=on_spooled)
    loop.add_reader(conn.fileno(), on_parent)
    limits = listener_limits(cfg.submission)  # this child's connections
    server = await loop.create_server(
        lambda: submission_protocol(hub, handler, throttle, tls, authenticator, limits), sock=sock)
    conn.send(("ready", ""))
    await done.wait()
    server.close()
