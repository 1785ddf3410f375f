"""The target's open files from /proc/PID/fd and fdinfo: read once a round, shared by every check."""

from __future__ import annotations

from ..errors import WpdumpError
from .process import list_proc, read_proc_link, read_proc_text

USERFAULTFD = "anon_inode:[userfaultfd]"
IO_URING = "anon_inode:[io_uring]"


def fd_targets(pid: int) -> dict[int, str]:
    """fd -> what /proc/PID/fd/FD links to (``socket:[…]``, ``anon_inode:[…]``, a path); empty if unreadable."""
    out: dict[int, str] = {}
    try:
        names = list_proc(pid, "fd")
    except WpdumpError:
        return out
    for name in names:
        try:
            out[int(name)] = read_proc_link(pid, f"fd/{name}")
        except (WpdumpError, ValueError):
            continue  # closed meanwhile
    return out


def fdinfo(pid: int, fd: int) -> str:
    """The text of /proc/PID/fdinfo/FD ('' when the fd is gone)."""
    return read_proc_text(pid, f"fdinfo/{fd}", "")


def fd_flags(pid: int, fd: int) -> int:
    """The open flags of ``fd`` in ``pid`` (fdinfo 'flags:', octal); 0 when the fd is gone."""
    for line in fdinfo(pid, fd).splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    return 0


def userfaultfds(pid: int, fds: dict[int, str] | None = None) -> list[int]:
    """The target's own userfaultfd descriptors."""
    fds = fd_targets(pid) if fds is None else fds
    return sorted(fd for fd, t in fds.items() if t == USERFAULTFD)
