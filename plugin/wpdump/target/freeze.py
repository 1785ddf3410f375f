"""Freezing a target: every thread seized and interrupted by a ptrace agent (as CRIU freezes), and resuming it.

A ptrace freeze is undone by the kernel when the freezer dies (tracees resume), involves no group stop (the
target's parent sees no CLD_STOPPED/CLD_CONTINUED), works on a pid namespace's init (which ignores SIGSTOP) and
keeps an already stopped target stopped. ``stop``/``cont`` (SIGSTOP/SIGCONT) remain for tools/bench.
"""

from __future__ import annotations

import errno
import os
import signal
import time

from ..errors import TrackerError, no_such_process
from .agent import Agent
from .process import all_stopped, thread_states

_active: dict[int, Freezer] = {}


class Freezer:
    """``pid`` frozen by a ptrace agent until :meth:`thaw` (or this process's death)."""

    def __init__(self, pid: int) -> None:
        t0 = time.perf_counter()
        self.pid = pid
        self.agent = Agent(pid, all_threads=True)
        self.seconds = time.perf_counter() - t0
        _active[pid] = self

    def thaw(self, leave_stopped: bool = False) -> None:
        """Resume the target (``leave_stopped``: leave it in a group stop, state T); idempotent."""
        if _active.get(self.pid) is self:
            del _active[self.pid]
        try:
            self.agent.release(leave_stopped)
        finally:
            self.agent.close()

    def rseq_areas(self) -> list[tuple[int, int]]:
        return self.agent.rseq_areas()

    def madvise(self, ranges: list[tuple[int, int]], advice: int) -> list[tuple[int, int]]:
        return self.agent.madvise(ranges, advice)

    def __enter__(self) -> Freezer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.thaw()


def active(pid: int) -> Freezer | None:
    """The freezer holding ``pid`` in this process, if any (syscalls are injected through it)."""
    return _active.get(pid)


def _send(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        raise no_such_process(pid) from None


def stop(pid: int, timeout: float = 5.0) -> float:
    """SIGSTOP ``pid`` and wait until all its threads are stopped ('T'); returns the seconds it took."""
    t0 = time.perf_counter()
    _send(pid, signal.SIGSTOP)
    deadline = t0 + timeout
    spins = 0
    while True:
        if all_stopped(pid):
            return time.perf_counter() - t0
        if all(s == "X" for s in thread_states(pid)):
            raise no_such_process(pid)
        if time.perf_counter() > deadline:
            raise TrackerError(f"pid {pid} did not stop within {timeout} s", pid=pid, errno=errno.ETIMEDOUT)
        spins += 1
        if spins > 100:  # busy-poll first (stopping takes tens of µs), then back off
            time.sleep(0.0005)


def cont(pid: int) -> None:
    """Resume a target stopped with :func:`stop`."""
    _send(pid, signal.SIGCONT)


def open_userfaultfd(pid: int, pidfd: int = -1) -> int:
    """A userfaultfd created inside ``pid`` and taken into this process; the target keeps no copy.

    Injected by the freezing agent when ``pid`` is frozen, else by an agent that seizes one thread for it."""
    fr = active(pid)
    if fr is not None:
        return fr.agent.userfaultfd()
    with Agent(pid, all_threads=False) as ag:
        return ag.userfaultfd()
