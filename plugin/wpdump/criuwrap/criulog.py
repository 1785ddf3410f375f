"""A log file in CRIU's format: "(SS.UUUUUU) message", errors as "Error (wpdump-criu): message"."""

from __future__ import annotations

import time


class Log:
    """Lines kept in memory and written to ``path`` by flush() (the images directory may be replaced
    while a pre-dump runs: the file is written by path afterwards). File-like for print()."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.t0 = time.monotonic()
        self.lines: list[str] = []
        self.first_error: str | None = None
        self._opened = False
        self._partial = ""

    def _add(self, text: str) -> None:
        t = time.monotonic() - self.t0
        self.lines.append(f"({int(t):02d}.{int(t * 1e6) % 1000000:06d}) {text}\n")

    def info(self, msg: str) -> str:
        self._add(f"wpdump-criu: {msg}")
        return msg

    def error(self, msg: str) -> str:
        self._add(f"Error (wpdump-criu): {msg}")
        if self.first_error is None:
            self.first_error = msg
        return msg

    def write(self, s: str) -> int:
        """print() target: each complete line becomes one log line."""
        self._partial += s
        *done, self._partial = self._partial.split("\n")
        for ln in done:
            if ln:
                self._add(ln)
        return len(s)

    def flush(self) -> None:
        if self.path is None or not self.lines:
            return
        # a new log, as CRIU truncates its log file; later flushes of the same log append
        with open(self.path, "a" if self._opened else "w") as f:
            f.writelines(self.lines)
        self._opened = True
        self.lines = []
