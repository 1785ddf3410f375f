"""A guard for the source tree around the final dump: a small process that resumes it should ``wpdump migrate``
die before the destination confirmed (SIGKILL included).

``python -m wpdump.migrate.guard`` reads lines on its stdin: ``pid N`` (a process of the tree), ``criu N`` (a CRIU
dumping it), ``done`` (the destination runs the tree: leave it). At end of file without ``done`` it waits for the
CRIUs to exit (CRIU resumes or leaves the tree stopped only as it ends; an EOF on its page-server socket ends it)
and then resumes every listed process that is stopped.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys

from . import tree

CRIU_WAIT = 600.0


class Guard:
    """Started before the final dump; ``done()`` once the destination confirmed, ``close()`` otherwise."""

    def __init__(self, pids: list[int]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "wpdump.migrate.guard"], stdin=subprocess.PIPE,
                                     start_new_session=True)  # a Ctrl-C to our group must not end it
        self.watch(pids)

    def _say(self, line: str) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()

    def watch(self, pids: list[int]) -> None:
        for p in pids:
            self._say(f"pid {p}")

    def criu(self, pid: int) -> None:
        self._say(f"criu {pid}")

    def done(self) -> None:
        self._say("done")
        self.close()

    def close(self) -> None:
        """Without ``done``: the guard resumes the stopped processes once CRIU is gone (the caller may have
        resumed them already)."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        self.proc.wait()


def _wait_gone(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return  # already gone
    try:
        select.select([fd], [], [], CRIU_WAIT)
    finally:
        os.close(fd)


def main() -> int:
    pids: list[int] = []
    criu: list[int] = []
    for line in sys.stdin:
        word, _, arg = line.strip().partition(" ")
        if word == "done":
            return 0
        if word == "pid" and arg.isdigit():
            pids.append(int(arg))
        elif word == "criu" and arg.isdigit():
            criu.append(int(arg))
    for c in criu:
        _wait_gone(c)
    tree.resume(pids)
    return 0


if __name__ == "__main__":
    sys.exit(main())
