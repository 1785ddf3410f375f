"""The source's process tree: its pids, resuming it after ``criu dump --leave-stopped``, ending it."""

from __future__ import annotations

import contextlib
import os
import signal

from ..errors import NoSuchProcess
from ..target.tree import read_tree


def pids(root: int) -> list[int]:
    """``root`` and its descendants (host pids), root first."""
    try:
        return [m.pid for m in read_tree(root)]
    except NoSuchProcess:
        return []


def resume(tree: list[int]) -> list[str]:
    """SIGCONT every process CRIU left stopped (``--leave-stopped`` stops them with SIGSTOP); returns problems."""
    problems = []
    for p in tree:
        try:
            with open(f"/proc/{p}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "T":  # only what is stopped: no stray SIGCONT
                    continue
            os.kill(p, signal.SIGCONT)
        except OSError as e:
            problems.append(f"pid {p}: {e.strerror}")
    return problems


def kill(root: int) -> None:
    """End the source tree after the destination confirmed: SIGKILL to its root (a pid-namespace init takes its
    namespace with it); the other processes too, for a tree without its own pid namespace."""
    for p in reversed(pids(root)):
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)
