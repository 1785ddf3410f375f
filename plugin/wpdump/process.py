"""Facts about a target process read from /proc: existence, state, start time, threads."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from .errors import NoSuchProcess, TargetExited


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/PID/stat that wpdump uses."""

    pid: int
    comm: str
    state: str
    start_ticks: int  # field 22: start time in clock ticks since boot


def read_stat(pid: int) -> ProcStat:
    """Parse /proc/PID/stat; raises NoSuchProcess when the pid does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except FileNotFoundError:
        raise NoSuchProcess(f"no such process: {pid}", pid=pid, errno=errno.ESRCH) from None
    except ProcessLookupError:
        raise NoSuchProcess(f"no such process: {pid}", pid=pid, errno=errno.ESRCH) from None
    lp, rp = raw.index("("), raw.rindex(")")
    rest = raw[rp + 2 :].split()
    return ProcStat(pid=pid, comm=raw[lp + 1 : rp], state=rest[0], start_ticks=int(rest[19]))


PF_KTHREAD = 0x00200000


def is_kernel_thread(pid: int) -> bool:
    """True for a kernel thread (PF_KTHREAD in the flags of /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return int(raw[raw.rindex(")") + 2 :].split()[6]) & PF_KTHREAD != 0


def is_gone(pid: int) -> bool:
    """True when the process no longer runs: absent, a zombie or dead."""
    try:
        return read_stat(pid).state in ("Z", "X", "x")
    except NoSuchProcess:
        return True


def check_alive(pid: int) -> ProcStat:
    """Return the stat of a running pid; raise TargetExited if it is a zombie."""
    st = read_stat(pid)
    if st.state in ("Z", "X", "x"):
        raise TargetExited(f"target {pid} exited", pid=pid, errno=errno.ESRCH)
    return st


def threads(pid: int) -> list[int]:
    """Thread ids of ``pid``, the main thread first."""
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        raise NoSuchProcess(f"no such process: {pid}", pid=pid, errno=errno.ESRCH) from None
    tids.sort(key=lambda t: t != pid)
    return tids


def thread_state(pid: int, tid: int) -> str:
    """One-letter scheduler state of a thread, or 'X' if it is gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return "X"
    return raw[raw.rindex(")") + 2]


def open_mapped_file(pid: int, start: int, end: int, dev: str, inode: int, path: str) -> int:
    """A read-only fd of the file mapped at [start, end) of ``pid``: /proc/PID/map_files, or, where that is
    closed to the caller (docs/kernel.md rule 31: EPERM without CAP_CHECKPOINT_RESTORE, also for one's own process),
    the mapping's path when it still names the very file mapped (same device and inode as in maps)."""
    try:
        return os.open(f"/proc/{pid}/map_files/{start:x}-{end:x}", os.O_RDONLY | os.O_CLOEXEC)
    except PermissionError as e:
        if not path.startswith("/") or path.endswith(" (deleted)"):
            raise
        first = e
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        raise first from None
    st = os.fstat(fd)
    major, _, minor = dev.partition(":")
    try:
        same = (st.st_ino == inode and os.major(st.st_dev) == int(major, 16) and os.minor(st.st_dev) == int(minor, 16))
    except ValueError:
        same = False
    if not same:
        os.close(fd)
        raise first
    return fd
