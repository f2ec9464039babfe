"""The crypto worker processes: each fed through its own pair of pipes by one thread.

This replaces ``concurrent.futures.ProcessPoolExecutor``, for two reasons:

- A worker that died (the OOM killer, a crash in a C library on hostile input) broke that pool
  for good: every later job failed until the hub was restarted, so all case mail was held and
  encrypted inbound mail refused. Here the job the worker had fails alone (``WorkerLost``), a
  job it never received is given to a new worker, and the pool goes on.
- Its manager and feeder threads and 64 KiB pipes: a 200 KiB job and its 270 KB result crossed
  in about eight pieces, each a wake-up, about ten context switches a call in the hub's main
  process. Here a job is one write into a pipe grown to 1 MiB, and its result one read.

A worker needs no watch on its parent: when the hub exits or is killed, the job pipe's writing
end closes and the worker's next read ends it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import queue
import signal
import struct
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from mailhub.crypto.gpg_process import grow_pipe
from mailhub.errors import WorkerLost
from mailhub.heap_reuse import keep_freed_memory

log = logging.getLogger("mailhub.crypto")

_HEADER = struct.Struct("!Q")  # a frame: its length, then a pickle


def write_frame(fd: int, data: bytes) -> None:
    """Write one frame, blocking until all of it is in the pipe."""
    views = [memoryview(_HEADER.pack(len(data))), memoryview(data)]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def _read_into(fd: int, buf: bytearray) -> bool:
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = os.readv(fd, [view[got:]])
        if n == 0:
            return False
        got += n
    return True


def read_frame(fd: int) -> bytearray | None:
    """Read one frame; None if the other end closed the pipe before a whole frame came."""
    header = bytearray(_HEADER.size)
    if not _read_into(fd, header):
        return None
    body = bytearray(_HEADER.unpack(header)[0])
    return body if _read_into(fd, body) else None


def _dumps_outcome(outcome: tuple[str, Any]) -> bytes:
    try:
        return pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 - an unpicklable result or exception
        what = "exception" if outcome[0] == "raise" else "result"
        return pickle.dumps(("raise", RuntimeError(f"{what} not transferable: {exc!r}")))


def worker_main(jobs: Connection, results: Connection) -> None:
    """A worker's loop: a job frame in, its outcome frame out, until the job pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the hub decides
    keep_freed_memory()
    rx, tx = jobs.fileno(), results.fileno()
    while (frame := read_frame(rx)) is not None:
        try:
            fn, args = pickle.loads(frame)
            outcome: tuple[str, Any] = ("ok", fn(*args))
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
            outcome = ("raise", exc)
        del frame
        try:
            write_frame(tx, _dumps_outcome(outcome))
        except BrokenPipeError:
            return  # the hub is gone


class _Worker:
    """One worker process and the parent's ends of its two pipes."""

    def __init__(self, ctx: multiprocessing.context.BaseContext) -> None:
        jobs_r, self.jobs = ctx.Pipe(duplex=False)
        self.results, results_w = ctx.Pipe(duplex=False)
        grow_pipe(self.jobs.fileno())
        grow_pipe(self.results.fileno())
        self.proc = ctx.Process(target=worker_main, args=(jobs_r, results_w),  # type: ignore[attr-defined]
                                name="mailhub-crypto", daemon=True)
        self.proc.start()
        jobs_r.close()  # only the worker holds these now: its death is our EOF or EPIPE
        results_w.close()

    @property
    def pid(self) -> int | None:
        return self.proc.pid  # type: ignore[no-any-return]

    def send(self, data: bytes) -> bool:
        """False if the worker is gone (it received nothing of this job)."""
        try:
            write_frame(self.jobs.fileno(), data)
            return True
        except BrokenPipeError:
            return False

    def receive(self) -> bytearray | None:
        return read_frame(self.results.fileno())

    def stop(self, timeout: float = 10.0) -> None:
        self.jobs.close()  # EOF: an idle worker leaves its loop
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout)
        self.results.close()

    def exit_text(self) -> str:
        self.proc.join(5)
        code = self.proc.exitcode
        if code is None:
            return "stopped answering"
        if code < 0:
            return f"was killed by signal {-code}"
        return f"exited with status {code}"


@dataclass
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: Future[Any] = field(default_factory=Future)


class WorkerPool:
    """``count`` worker processes (spawned at the first job); ``submit`` returns a Future."""

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError("a worker pool needs at least one worker")
        self.count = count
        self._ctx = multiprocessing.get_context("spawn")
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._drivers: list[threading.Thread] = []
        self._workers: dict[int, _Worker] = {}  # driver slot -> its current worker
        self._lock = threading.Lock()
        self._closed = False
        self.restarts = 0

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        job = _Job(fn, args)
        with self._lock:
            if self._closed:
                raise RuntimeError("the crypto worker pool is shut down")
            if not self._drivers:
                for slot in range(self.count):
                    driver = threading.Thread(target=self._drive, args=(slot,), daemon=True,
                                              name=f"mailhub-crypto-{slot}")
                    driver.start()
                    self._drivers.append(driver)
            self._jobs.put(job)
        return job.future

    def worker_pids(self) -> list[int]:
        with self._lock:
            return [w.pid for w in self._workers.values() if w.pid is not None]

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancel jobs not yet started, let running ones finish, stop the workers."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            drivers = list(self._drivers)
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.future.cancel()
        for _ in drivers:
            self._jobs.put(None)
        for driver in drivers:
            driver.join(timeout + 10)

    def _worker(self, slot: int) -> _Worker:
        """The slot's worker, started if need be (only the slot's own driver starts it, and
        outside the lock: spawning takes a tenth of a second, which ``submit`` must not wait)."""
        with self._lock:
            worker = self._workers.get(slot)
        if worker is None:
            worker = _Worker(self._ctx)
            with self._lock:
                self._workers[slot] = worker
        return worker

    def _lost(self, slot: int, worker: _Worker) -> str:
        with self._lock:
            self._workers.pop(slot, None)
            self.restarts += 1
        why = worker.exit_text()
        worker.stop()
        log.warning("crypto worker %s %s; a new one takes its place", worker.pid, why)
        return why

    def _drive(self, slot: int) -> None:
        while (job := self._jobs.get()) is not None:
            if job.future.set_running_or_notify_cancel():
                self._run(slot, job)
        with self._lock:
            worker = self._workers.pop(slot, None)
        if worker is not None:
            worker.stop()

    def _run(self, slot: int, job: _Job) -> None:
        try:
            data = pickle.dumps((job.fn, job.args), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - the caller's mistake, not the worker's
            job.future.set_exception(exc)
            return
        worker = self._worker(slot)
        if not worker.send(data):  # it died while idle: this job never reached it
            self._lost(slot, worker)
            worker = self._worker(slot)
            if not worker.send(data):
                job.future.set_exception(WorkerLost(f"a new crypto worker {self._lost(slot, worker)}"))
                return
        del data
        frame = worker.receive()
        if frame is None:
            why = self._lost(slot, worker)
            job.future.set_exception(WorkerLost(f"the crypto worker {why} during this job"))
            return
        try:
            kind, value = pickle.loads(frame)
        except Exception as exc:  # noqa: BLE001 - e.g. an exception class that will not rebuild
            job.future.set_exception(RuntimeError(f"a worker's outcome could not be read: {exc!r}"))
            return
        if kind == "ok":
            job.future.set_result(value)
        else:
            job.future.set_exception(value)
