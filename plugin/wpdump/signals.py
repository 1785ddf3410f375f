"""Holding back the signals that end a command (SIGINT, SIGTERM, SIGHUP) around steps that must not be cut."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

ENDING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def held() -> Iterator[set[signal.Signals]]:
    """Block SIGINT/SIGTERM/SIGHUP in this thread (the main thread only: Python runs handlers there) until the
    block ends, when a pending one is delivered. Yields the mask to restore in a child forked meanwhile.
    A fork copies the blocked mask: a child that execs must unblock them itself."""
    if threading.current_thread() is not threading.main_thread():
        yield signal.pthread_sigmask(signal.SIG_BLOCK, ())
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, ENDING)
    try:
        yield old
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
