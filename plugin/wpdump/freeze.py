"""Stopping a target with SIGSTOP until every thread is in the stopped state, and resuming it."""

from __future__ import annotations

import errno
import os
import signal
import time

from .errors import NoSuchProcess, TrackerError
from .process import thread_state, threads


def _send(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        raise NoSuchProcess(f"no such process: {pid}", pid=pid, errno=errno.ESRCH) from None


def stop(pid: int, timeout: float = 5.0) -> float:
    """SIGSTOP ``pid`` and wait until all its threads are stopped ('T'); returns the seconds it took."""
    t0 = time.perf_counter()
    _send(pid, signal.SIGSTOP)
    deadline = t0 + timeout
    spins = 0
    while True:
        states = [thread_state(pid, t) for t in threads(pid)]
        if all(s in ("T", "t", "X") for s in states):
            if all(s == "X" for s in states):
                raise NoSuchProcess(f"no such process: {pid}", pid=pid, errno=errno.ESRCH)
            return time.perf_counter() - t0
        if time.perf_counter() > deadline:
            raise TrackerError(f"pid {pid} did not stop within {timeout} s", pid=pid, errno=errno.ETIMEDOUT)
        spins += 1
        if spins > 100:  # busy-poll first (stopping takes tens of µs), then back off
            time.sleep(0.0005)


def cont(pid: int) -> None:
    """Resume a target stopped with :func:`stop`."""
    _send(pid, signal.SIGCONT)
