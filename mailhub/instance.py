"""Who this serving process is, for claims in a database other instances may share.

A claim names its owner as "host:pid:random" (the random part: a restarted process that got
the same pid is another instance). At start, claims whose owner ran on this host and is gone
are free at once; another host's claims are left to go stale, since its process may be alive.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable


def default_instance_id() -> str:
    """Unique per process: host, pid and a random suffix (a restarted pid is a new instance)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def pid_alive(pid: int) -> bool:
    """Whether a process of this host still runs (a pid owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_here(owner: str, host: str, alive: Callable[[int], bool] = pid_alive) -> bool:
    """Whether a claim's ``owner`` ran on ``host`` and its process is gone."""
    name, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    return name == host and pid.isdigit() and not alive(int(pid))
