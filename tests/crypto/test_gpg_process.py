"""The crypto layer's process runner: whole outputs, both ways of waiting, no hangs."""

from __future__ import annotations

import os

import pytest

from mailhub.crypto import gpg_process


def _data(size: int) -> bytes:
    line = b"0123456789abcdefghijklmnopqrstuvwxyz" * 2 + b"\n"
    return (line * (size // len(line) + 1))[:size]


@pytest.mark.parametrize("size", [0, 1, 4096, 300_000, 3_000_000])
@pytest.mark.parametrize("expect", [None, "bound"])
def test_output_comes_back_whole(size: int, expect: str | None) -> None:
    """Input larger than any pipe, and output read as it comes or after the exit."""
    data = _data(size)
    bound = 2 * size + 1 if expect else None
    done = gpg_process.run(["sh", "-c", "cat; echo status >&2"], data, timeout=60,
                           expect_output=bound)
    assert done.returncode == 0
    assert done.stdout == data
    assert done.stderr == b"status\n"


def test_a_process_that_does_not_read_its_input() -> None:
    done = gpg_process.run(["sh", "-c", "echo no >&2; exit 3"], _data(5_000_000), timeout=60)
    assert done.returncode == 3
    assert done.stderr == b"no\n"


def test_a_missing_program_raises_file_not_found() -> None:
    with pytest.raises(FileNotFoundError):
        gpg_process.run(["/nonexistent/gpg"], b"x", timeout=10)


def test_a_process_past_its_time_is_killed() -> None:
    with pytest.raises(gpg_process.TimedOut):
        gpg_process.run(["sleep", "30"], b"", timeout=0.3)


def test_with_a_bound_a_leftover_grandchild_does_not_hold_the_result() -> None:
    """gpg may start a daemon that keeps the pipes open: with an exit watch the result is
    there once gpg itself has exited (without one, EOF would wait for the daemon)."""
    done = gpg_process.run(["sh", "-c", "sleep 5 & echo out; echo err >&2"], b"",
                           timeout=10, expect_output=100)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"out\n", b"err\n")


def test_no_descriptor_is_left_open() -> None:
    before = set(os.listdir("/proc/self/fd"))
    for expect in (None, 1000):
        gpg_process.run(["cat"], b"abc", timeout=10, expect_output=expect)
    with pytest.raises(gpg_process.TimedOut):
        gpg_process.run(["sleep", "30"], b"", timeout=0.2, expect_output=10)
    assert set(os.listdir("/proc/self/fd")) <= before


def test_a_process_that_closes_its_outputs_but_runs_on_is_stopped_at_its_time() -> None:
    with pytest.raises(gpg_process.TimedOut):
        gpg_process.run(["sh", "-c", "exec >&- 2>&-; sleep 30"], b"", timeout=0.5)
