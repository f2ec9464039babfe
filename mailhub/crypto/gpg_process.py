"""Runs one gpg process: feeds it its input and collects its output with few wake-ups.

``subprocess.run(input=...)`` writes the input 4 KiB at a time and wakes for every piece gpg
writes back: for a 200 KB message that is about 90 polls and 50 context switches, a quarter
of the crypto worker's CPU. Here the pipes are grown (``F_SETPIPE_SZ``, up to 1 MiB) so that
the whole input goes in one write; when the caller knows the output fits the pipe (encryption:
at most ``expect_output`` bytes), the outputs are not watched at all: the loop waits for the
process to exit (a pidfd) and then reads everything at once (stderr, gpg's status lines, is a
few KiB against a 1 MiB pipe; a gpg that filled it would block and time out, failing closed).
Output that may be larger (decryption) is read as it comes, so gpg never blocks on a full
pipe. Nothing here is gpg-specific but the name: it is the crypto layer's process runner.
"""

from __future__ import annotations

import fcntl
import math
import os
import select
import subprocess
import time
from typing import NamedTuple

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
PIPE_SIZE = 1 << 20
_READ = 1 << 20


class Finished(NamedTuple):
    returncode: int
    stdout: bytes
    stderr: bytes


class TimedOut(Exception):
    """The process ran past its time and was killed."""


def grow_pipe(fd: int) -> int:
    """Make a pipe as large as allowed (1 MiB, or the system's limit); returns its size."""
    try:
        return int(fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE))
    except OSError:  # over /proc/sys/fs/pipe-max-size for an unprivileged user
        try:
            return int(fcntl.fcntl(fd, F_GETPIPE_SZ))
        except OSError:
            return 65536


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux 5.3+: watch stdout instead
        return None


def _drain(fd: int, into: list[bytes]) -> bool:
    """Read what is there without blocking; True at end of file."""
    while True:
        try:
            chunk = os.read(fd, _READ)
        except BlockingIOError:
            return False
        if not chunk:
            return True
        into.append(chunk)


class _Fds:
    """The parent's pipe ends; each closed once, whatever path the run takes."""

    def __init__(self, **fds: int) -> None:
        self.open = dict(fds)

    def close(self, name: str) -> None:
        fd = self.open.pop(name, None)
        if fd is not None:
            os.close(fd)

    def close_all(self) -> None:
        for name in list(self.open):
            self.close(name)


def run(cmd: list[str], data: bytes, *, timeout: float, pass_fds: tuple[int, ...] = (),
        expect_output: int | None = None) -> Finished:
    """Run ``cmd`` with ``data`` on stdin; its stdout and stderr, whole.

    ``expect_output``: an upper bound on stdout's size, when the caller knows one. Raises
    FileNotFoundError when the program is missing and TimedOut past ``timeout`` seconds."""
    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    fds = _Fds(stdin=in_w, stdout=out_r, stderr=err_r)
    out_room, err_room = grow_pipe(out_w), grow_pipe(err_w)
    if data:
        grow_pipe(in_w)
    try:
        proc = subprocess.Popen(cmd, stdin=in_r, stdout=out_w, stderr=err_w, pass_fds=pass_fds)
    except BaseException:
        fds.close_all()
        raise
    finally:
        for fd in (in_r, out_w, err_w):
            os.close(fd)
    if expect_output is not None and expect_output < out_room and err_room >= PIPE_SIZE:
        pidfd = _pidfd(proc.pid)
        if pidfd is not None:
            fds.open["exit"] = pidfd
    outs: dict[int, list[bytes]] = {out_r: [], err_r: []}
    deadline = time.monotonic() + timeout
    try:
        _exchange(proc, data, fds, outs, deadline)
        try:  # its outputs are closed: it has exited, or is about to
            rc = proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise TimedOut from None
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        fds.close_all()
    return Finished(rc, b"".join(outs[out_r]), b"".join(outs[err_r]))


def _exchange(proc: subprocess.Popen[bytes], data: bytes, fds: _Fds,
              outs: dict[int, list[bytes]], deadline: float) -> None:
    """Write ``data``, then read until the outputs end or, when there is an exit watch, until
    the process has exited (what it wrote is in the pipes then: read without waiting)."""
    in_w, out_r, err_r = fds.open["stdin"], fds.open["stdout"], fds.open["stderr"]
    exit_fd = fds.open.get("exit")
    for fd in (in_w, out_r, err_r):
        os.set_blocking(fd, False)
    poll = select.poll()
    view, sent = memoryview(data), 0
    if data:
        poll.register(in_w, select.POLLOUT)
    else:
        fds.close("stdin")
    reading = {exit_fd} if exit_fd is not None else {out_r, err_r}
    for fd in reading:
        poll.register(fd, select.POLLIN)
    while reading or sent < len(view):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimedOut
        for fd, _ in poll.poll(max(1, math.ceil(left * 1000))):
            if fd == in_w:
                try:
                    sent += os.write(in_w, view[sent:])
                except BlockingIOError:
                    continue
                except BrokenPipeError:  # it stopped reading: its status says why
                    sent = len(view)
                if sent >= len(view):
                    poll.unregister(in_w)
                    fds.close("stdin")
            elif fd == exit_fd:
                proc.wait()
                _drain(out_r, outs[out_r])
                _drain(err_r, outs[err_r])
                return
            elif _drain(fd, outs[fd]):
                poll.unregister(fd)
                reading.discard(fd)
