"""A guard for the source tree while CRIU has left it stopped: a small process that resumes it should
``wpdump migrate`` die before the destination confirmed (SIGKILL included).

``python -m wpdump.migrate.guard PID...`` reads its stdin: ``done`` (the destination runs the tree: leave it) ends it
quietly; end of file without it (the migrate command is gone, or gave up) resumes every listed process that is
stopped.
"""

from __future__ import annotations

import subprocess
import sys

from . import tree


class Guard:
    """Started once CRIU left the tree stopped; ``done()`` when the destination confirmed, ``close()`` otherwise."""

    def __init__(self, pids: list[int]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "wpdump.migrate.guard", *map(str, pids)],
                                     stdin=subprocess.PIPE, start_new_session=True)  # not killed by our Ctrl-C

    def done(self) -> None:
        self.proc.stdin.write(b"done\n")
        self.close()

    def close(self) -> None:
        """Without ``done``: the guard resumes the stopped processes (the caller may have done so already)."""
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        self.proc.wait()


def main(argv: list[str]) -> int:
    pids = [int(a) for a in argv]
    if sys.stdin.buffer.read().strip() != b"done":
        tree.resume(pids)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
