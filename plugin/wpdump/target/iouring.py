"""io_uring fixed buffers of a target (IORING_REGISTER_BUFFERS), read from /proc/PID/fdinfo.

The kernel writes into these pinned pages without the tracker seeing it (docs/kernel.md rule 7),
so their pages are reported every round.
"""

from __future__ import annotations

import re

from .procfds import IO_URING, fd_targets, fdinfo

_BUF = re.compile(r"^\s*\d+:\s*0x([0-9a-f]+)\s*[/,]?\s*(\d+)", re.M)


def registered_buffers(pid: int, fds: dict[int, str] | None = None) -> list[tuple[int, int]]:
    """[start, end) of every buffer registered with any io_uring instance of ``pid`` (``fds``: fd_targets)."""
    out: list[tuple[int, int]] = []
    fds = fd_targets(pid) if fds is None else fds
    for fd, what in fds.items():
        if what != IO_URING:
            continue
        section = fdinfo(pid, fd).split("UserBufs:", 1)
        if len(section) < 2:
            continue
        body = re.split(r"\n\S", section[1], maxsplit=1)[0]
        for m in _BUF.finditer(body):
            start, length = int(m.group(1), 16), int(m.group(2))
            if length:
                out.append((start, start + length))
    return out
