"""``mailhub serve``: the listeners, the spool runner, delivery, IMAP ingest and the scheduler.

Everything runs on one asyncio loop; blocking work (fsync, database, gpg) goes to threads or the
crypto process pool. With more than one core, the submission port is served by child processes
(``SubmissionProcesses``) so that receiving mail and processing it use different cores; the
database is written by one thread (``GroupCommit``), whose commits many messages share. Ready
means both SMTP ports accept connections. On start, spool files left by a crash are processed
again and queued messages are retried at once. SIGTERM/SIGINT stop the listeners first, then let
in-flight work finish.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from sqlmodel import Session

from mailhub.app import Hub
from mailhub.crypto.engine import CryptoEngine
from mailhub.crypto.openpgp_ops import kill_agent
from mailhub.deliver import queue
from mailhub.deliver.retention import PayloadSweeper
from mailhub.deliver.worker import DeliveryWorker
from mailhub.ingress.auth import FailureThrottle
from mailhub.ingress.handlers import InboundHandler, SubmissionHandler
from mailhub.ingress.smtp_limits import listener_limits
from mailhub.ingress.smtp_server import HubSMTP, make_authenticator, server_tls_context
from mailhub.ingress.submission_procs import SubmissionProcesses, check_user, submission_protocol
from mailhub.outbound.pipeline import OutboundPipeline
from mailhub.outbound.queueing import QueueWriter

log = logging.getLogger("mailhub.serve")

Processor = Callable[[str, str], Awaitable[None]]
BatchProcessor = Callable[[str, list[str]], Awaitable[dict[str, BaseException]]]


class SpoolRunner:
    """Feeds spooled messages to their processor; a failing message is retried, then shunted.

    Messages waiting together for a listener with a batch processor go to it together (up to
    ``max_batch``): they share its thread hops, queries and commits. At most ``concurrency``
    batches or single messages are in progress at once, so one batch's commit overlaps the
    next one's preparation.
    """

    def __init__(self, hub: Hub, processors: dict[str, Processor], concurrency: int = 8,
                 max_failures: int = 5, retry_after: float = 30.0, max_batch: int = 32) -> None:
        self.hub = hub
        self.processors = processors
        self.batch_processors: dict[str, BatchProcessor] = {}
        self.queue: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue()
        self.concurrency = concurrency
        self.max_failures = max_failures
        self.retry_after = retry_after
        self.max_batch = max_batch
        self.failures: dict[str, int] = {}
        self.inflight: set[str] = set()
        self._carry: list[tuple[str, str] | None] = []  # taken from the queue, not yet used

    def submit(self, listener: str, spool_id: str) -> None:
        if spool_id not in self.inflight:
            self.inflight.add(spool_id)
            self.queue.put_nowait((listener, spool_id))

    def recover(self) -> int:
        n = 0
        for listener in self.processors:
            for sid in self.hub.spool.pending(listener):
                self.submit(listener, sid)
                n += 1
        return n

    async def _batch(self, listener: str, spool_ids: list[str]) -> None:
        try:
            if listener in self.batch_processors:
                failed = await self.batch_processors[listener](listener, spool_ids)
            else:
                results = await asyncio.gather(
                    *(self.processors[listener](listener, sid) for sid in spool_ids),
                    return_exceptions=True)
                failed = {sid: r for sid, r in zip(spool_ids, results, strict=True)
                          if isinstance(r, BaseException)}
        except Exception as exc:  # noqa: BLE001 - the processor itself broke: all of them
            failed = dict.fromkeys(spool_ids, exc)
        for sid in spool_ids:
            self.inflight.discard(sid)
            exc = failed.get(sid)
            if exc is None or isinstance(exc, FileNotFoundError):
                self.failures.pop(sid, None)  # done (or already processed elsewhere)
            else:
                self._failed(listener, sid, exc)

    def _failed(self, listener: str, spool_id: str, exc: BaseException) -> None:
        count = self.failures.get(spool_id, 0) + 1
        self.failures[spool_id] = count
        log.error("processing spool_id=%s failed (%d/%d): %s", spool_id, count,
                  self.max_failures, exc, exc_info=exc)
        if count >= self.max_failures:
            self.failures.pop(spool_id, None)
            self.shunt(listener, spool_id)
        else:
            asyncio.get_running_loop().call_later(self.retry_after, self.submit, listener,
                                                  spool_id)

    def shunt(self, listener: str, spool_id: str) -> None:
        """Set a message that keeps failing aside (still sealed); never drop it."""
        target = self.hub.spool.shunt(listener, spool_id)
        log.error("shunted spool_id=%s to %s after repeated failures", spool_id,
                  target or self.hub.spool.root / "shunt")

    def _take(self, first: tuple[str, str]) -> dict[str, list[str]]:
        """The first message and whatever else is waiting, by listener, at most a batch each.

        The first message that does not fit (or the stop marker) is carried over to be taken
        first next time; everything after it stays queued, so the order is kept."""
        groups: dict[str, list[str]] = {first[0]: [first[1]]}
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if item is None or len(groups.get(item[0], ())) >= self.max_batch:
                self._carry.append(item)
                break
            groups.setdefault(item[0], []).append(item[1])
        return groups

    async def _next(self) -> tuple[str, str] | None:
        return self._carry.pop() if self._carry else await self.queue.get()

    async def run(self, stop: asyncio.Event) -> None:
        sem = asyncio.Semaphore(self.concurrency)
        tasks: set[asyncio.Task[None]] = set()

        async def guarded(listener: str, sids: list[str]) -> None:
            try:
                await self._batch(listener, sids)
            finally:
                sem.release()

        # stopping puts None in the queue: one await per message, not a wait() on two futures
        stopper = asyncio.ensure_future(stop.wait())
        stopper.add_done_callback(lambda _: self.queue.put_nowait(None))
        while not stop.is_set():
            item = await self._next()
            if item is None:
                break
            await sem.acquire()  # wait for a slot first: meanwhile more messages gather
            for listener, sids in self._take(item).items():
                if listener != item[0]:
                    await sem.acquire()
                task = asyncio.create_task(guarded(listener, sids))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        stopper.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


class Server:
    """The running hub. ``start`` returns when both SMTP ports accept connections."""

    def __init__(self, hub: Hub, *, crypto_workers: int | None = None,
                 listener_processes: int | None = None) -> None:
        self.hub = hub
        cfg = hub.config
        workers = cfg.crypto.worker_count if crypto_workers is None else crypto_workers
        if listener_processes is None:  # inline mode (crypto_workers=0: tests) keeps one process
            listener_processes = 0 if workers == 0 else min(4, (os.cpu_count() or 1) - 1)
        self.submission_procs = (SubmissionProcesses(hub, listener_processes)
                                 if listener_processes > 0 else None)
        self.crypto = CryptoEngine(workers)
        self.stop_event = asyncio.Event()
        self.writer = QueueWriter(hub)
        # one writer thread for the hot path: messages share commits (each one is an fsync)
        self.commits = queue.GroupCommit(hub.engine)
        self.delivery = DeliveryWorker(hub.engine, hub.sealer, cfg.delivery, helo=cfg.hub.domain,
                                       on_failed=self._on_failed, commits=self.commits,
                                       files=hub.payload_files)
        self.writer.fresh = self.delivery.fresh  # queued payloads reach the senders in memory
        self.writer.files = hub.payload_files  # large payloads outside SQLite's WAL
        self.pipeline = OutboundPipeline(hub, self.crypto, on_queued=self.delivery.wake,
                                         writer=self.writer)
        self.pipeline.commits = self.commits
        self.sweeper = PayloadSweeper(cfg.delivery.keep_sent_payloads, files=hub.payload_files)
        self.processors: dict[str, Processor] = {"submission": self.pipeline.process}
        self.extra_tasks: list[Callable[[asyncio.Event], Awaitable[None]]] = []
        self.inbound_gate = None
        # a few batches at a time: messages arriving meanwhile gather into the next batch
        self.runner = SpoolRunner(hub, self.processors, concurrency=4)
        self.runner.batch_processors["submission"] = self.pipeline.process_many
        self.throttle = FailureThrottle(free_failures=cfg.submission.auth_failures_before_delay)
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: list[asyncio.Task[None]] = []

    def _on_failed(self, session: Session, item: queue.Claimed, reply: str) -> None:
        """The DSN, in the transaction that marks the row failed (the worker wakes itself)."""
        self.writer.dsn(session, item, reply)

    def check_user(self, login: str, password: str) -> bool:
        return check_user(self.hub, login, password)

    async def start(self) -> None:
        hub, cfg = self.hub, self.hub.config
        # spool fsyncs and database work wait on the disk in threads: enough of them that
        # concurrent sessions' fsyncs overlap (the journal commits them together)
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=32, thread_name_prefix="mailhub-io"))
        await asyncio.to_thread(hub.migrate)
        tls = server_tls_context(str(hub.keys.tls_cert), str(hub.keys.tls_key))
        authenticator = make_authenticator(self.check_user, self.throttle)
        sub_handler = SubmissionHandler(domain=cfg.hub.domain, spool=hub.spool,
                                        on_spooled=self.runner.submit)
        in_handler = InboundHandler(domain=cfg.hub.domain, spool=hub.spool,
                                    on_spooled=self.runner.submit, gate=self.inbound_gate)

        sub_limits, in_limits = listener_limits(cfg.submission), listener_limits(cfg.inbound)

        def submission_factory() -> HubSMTP:
            return submission_protocol(hub, sub_handler, self.throttle, tls, authenticator,
                                       sub_limits)

        def inbound_factory() -> HubSMTP:
            return HubSMTP(in_handler, limits=in_limits, hostname=cfg.hub.domain,
                           ident="mailhub ESMTP",
                           tls_context=tls, require_starttls=False, auth_required=False,
                           auth_exclude_mechanism=["LOGIN", "PLAIN"],
                           data_size_limit=cfg.inbound.max_message_size,
                           enable_SMTPUTF8=True, decode_data=False)

        loop = asyncio.get_running_loop()
        for factory, lc in ((submission_factory, cfg.submission), (inbound_factory, cfg.inbound)):
            if lc is cfg.submission and self.submission_procs is not None:
                await self.submission_procs.start(self.runner.submit)  # served by children
                continue
            server = await loop.create_server(factory, host=lc.listen.host, port=lc.listen.port)
            self._servers.append(server)
        n = await asyncio.to_thread(queue.retry_all_now, hub.engine)
        stale = await asyncio.to_thread(queue.recover_inflight, hub.engine)
        recovered = self.runner.recover()
        log.info("mailhub ready: submission %s, inbound %s; %d queued retried, %d in flight at "
                 "last stop, %d spooled recovered", cfg.submission.listen, cfg.inbound.listen,
                 n, len(stale), recovered)
        self._tasks.append(asyncio.create_task(self.runner.run(self.stop_event)))
        self._tasks.append(asyncio.create_task(self.delivery.run(self.stop_event)))
        self._tasks.append(asyncio.create_task(self.sweeper.run(self.commits, self.stop_event)))
        for extra in self.extra_tasks:
            self._tasks.append(asyncio.create_task(extra(self.stop_event)))

    def ports(self) -> list[int]:
        procs = self.submission_procs
        extra = [procs.sock.getsockname()[1]] if procs is not None and procs.sock else []
        return extra + [s.sockets[0].getsockname()[1] for s in self._servers]

    async def stop(self) -> None:
        if self.submission_procs is not None:
            await asyncio.to_thread(self.submission_procs.stop)
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        self.stop_event.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(self.delivery.close)
        await asyncio.to_thread(self.commits.close)
        if self.hub.payload_files is not None:
            self.hub.payload_files.close()
        self.crypto.close()
        # the gpg-agent that signing started would otherwise outlive the hub (gpg starts it
        # again when the next command needs it)
        await asyncio.to_thread(kill_agent, str(self.hub.keys.gnupg_home))

    async def serve_forever(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
        await done.wait()
        log.info("shutting down")
        await self.stop()


def build_server(hub: Hub, *, crypto_workers: int | None = None) -> Server:
    """Wire every part of a serving hub (the one place that knows them all)."""
    server = Server(hub, crypto_workers=crypto_workers)
    from mailhub.ingress.inbound_flow import InboundFlow
    from mailhub.ingress.inbound_gate import InboundGate

    server.inbound_gate = InboundGate(hub, server.crypto)
    inbound = InboundFlow(hub, server.writer, on_queued=server.delivery.wake)
    server.processors["inbound"] = inbound.process
    server.pipeline.case_hook = _outbound_case_hook(hub)

    from mailhub.scheduler.dispatcher import Dispatcher
    from mailhub.scheduler.ledger import care_plans

    care_plans(hub)  # validate every care plan at start-up: the error names file and step
    server.processors["scheduler"] = server.pipeline.process
    server.runner.batch_processors["scheduler"] = server.pipeline.process_many
    dispatcher = Dispatcher(hub, process=server.pipeline.process, on_queued=server.delivery.wake)
    server.extra_tasks.append(dispatcher.run)
    if hub.config.imap.enabled:
        from mailhub.ingress.imap_link import ImapLink

        link = ImapLink(hub, inbound, server.inbound_gate)
        inbound.on_filed = link.copy
        server.pipeline.on_filed = link.copy

        async def imap_task(stop: asyncio.Event) -> None:
            await asyncio.to_thread(link.start)
            await stop.wait()
            await asyncio.to_thread(link.stop)

        server.extra_tasks.append(imap_task)

    async def auto_release_loop(stop: asyncio.Event) -> None:
        from mailhub.outbound.release import auto_release

        while not stop.is_set():
            try:
                n = await auto_release(hub, server.pipeline)
                if n:
                    log.info("released %d held message(s) after new keys arrived", n)
                    server.delivery.wake()
            except Exception:
                log.exception("auto-release pass failed; continuing")
            try:
                await asyncio.wait_for(stop.wait(), timeout=5)
            except TimeoutError:
                pass

    server.extra_tasks.append(auto_release_loop)
    return server


def _outbound_case_hook(hub: Hub):  # type: ignore[no-untyped-def]
    """Files coordinators' messages into their cases; each record notes how it will travel."""
    from mailhub.cases.filing import OutboundItem, file_outbound_many
    from mailhub.crypto.protection import Protection

    def protection(prep) -> Protection:  # type: ignore[no-untyped-def]
        methods = {d.method for d in prep.decisions.values() if d.action == "encrypt"}
        enc = methods.pop() if len(methods) == 1 else ("openpgp" if methods else "none")
        return Protection(enc, "verified" if enc != "none" else "none")

    def hook(session, preps):  # type: ignore[no-untyped-def]
        return file_outbound_many(session, hub, [
            OutboundItem(p.raw, p.sender, list(p.decisions), protection(p), p.headers, p.to_cc)
            for p in preps])

    return hook
