"""Worker threads kept for the life of the process (the copy pipeline's readers and writer, the staging
directory's fsyncs and file creation): started at their first use, daemon threads, so that an exit never waits
for them (a ThreadPoolExecutor's threads are joined at exit: a command interrupted by Ctrl-C hung there 1 time
in 5). A forked child has none of its parent's threads: pools notice and start their own."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future


class Workers:
    """``n`` daemon threads running submitted calls in submission order (FIFO), results as Futures."""

    def __init__(self, n: int, name: str) -> None:
        self.n, self.name = n, name
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def submit(self, fn: Callable, *args: object) -> Future:
        f: Future = Future()
        with self._lock:
            if self._pid != os.getpid():  # forked: the threads stayed with the parent
                self._todo, self._threads, self._pid = queue.SimpleQueue(), [], os.getpid()
            if len(self._threads) < self.n:
                t = threading.Thread(target=self._run, args=(self._todo,), name=f"{self.name}-{len(self._threads)}",
                                     daemon=True)
                t.start()
                self._threads.append(t)
            self._todo.put((f, fn, args))
        return f

    @staticmethod
    def _run(todo: queue.SimpleQueue) -> None:
        while True:
            f, fn, args = todo.get()
            if not f.set_running_or_notify_cancel():
                continue
            try:
                f.set_result(fn(*args))
            except BaseException as e:  # handed to the caller
                f.set_exception(e)
