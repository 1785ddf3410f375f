"""Facts about a target process read from /proc: existence, state, start time, threads.

Every access to /proc/PID goes through :func:`open_proc` / :func:`read_proc`, which map errors one way:
the process (or thread) gone -> NoSuchProcess, refused -> AccessDenied, else the errno's error."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from ..errors import NoSuchProcess, TargetExited, TrackerError, WpdumpError, from_errno, no_such_process

READ_CHUNK = 1 << 20


def proc_error(e: OSError, pid: int, name: str) -> WpdumpError:
    """The one mapping of an OSError on /proc/PID/NAME to wpdump's errors."""
    if isinstance(e, (FileNotFoundError, ProcessLookupError)):
        return no_such_process(pid)
    return from_errno(e.errno or errno.EIO, pid, f"open /proc/PID/{name} of")


def open_proc(pid: int, name: str, flags: int = os.O_RDONLY) -> int:
    """An fd of /proc/PID/NAME (close-on-exec); errors mapped by :func:`proc_error`."""
    try:
        return os.open(f"/proc/{pid}/{name}", flags | os.O_CLOEXEC)
    except OSError as e:
        raise proc_error(e, pid, name) from None


def read_proc(pid: int, name: str) -> bytes:
    """The whole content of /proc/PID/NAME; errors mapped by :func:`proc_error`."""
    fd = open_proc(pid, name)
    try:
        parts = []
        while chunk := os.read(fd, READ_CHUNK):
            parts.append(chunk)
        return b"".join(parts)
    except OSError as e:
        raise proc_error(e, pid, name) from None
    finally:
        os.close(fd)


def read_proc_text(pid: int, name: str, default: str | None = None) -> str:
    """:func:`read_proc` decoded; with ``default``, that instead of any error (a thread or fd gone)."""
    try:
        return read_proc(pid, name).decode(errors="replace")
    except WpdumpError:
        if default is None:
            raise
        return default


def read_proc_link(pid: int, name: str) -> str:
    """Where the symlink /proc/PID/NAME points; errors mapped by :func:`proc_error`."""
    try:
        return os.readlink(f"/proc/{pid}/{name}")
    except OSError as e:
        raise proc_error(e, pid, name) from None


def list_proc(pid: int, name: str) -> list[str]:
    """The entries of the directory /proc/PID/NAME; errors mapped by :func:`proc_error`."""
    try:
        return os.listdir(f"/proc/{pid}/{name}")
    except OSError as e:
        raise proc_error(e, pid, name) from None


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/PID/stat that wpdump uses."""

    pid: int
    comm: str
    state: str
    start_ticks: int  # field 22: start time in clock ticks since boot


def read_stat(pid: int) -> ProcStat:
    """Parse /proc/PID/stat; raises NoSuchProcess when the pid does not exist."""
    raw = read_proc_text(pid, "stat")
    lp, rp = raw.index("("), raw.rindex(")")
    rest = raw[rp + 2 :].split()
    return ProcStat(pid=pid, comm=raw[lp + 1 : rp], state=rest[0], start_ticks=int(rest[19]))


PF_KTHREAD = 0x00200000


def exists(pid: int) -> bool:
    """True while /proc/PID exists (a zombie still does)."""
    return os.path.exists(f"/proc/{pid}")


def is_kernel_thread(pid: int) -> bool:
    """True for a kernel thread (PF_KTHREAD in the flags of /proc/PID/stat)."""
    raw = read_proc_text(pid, "stat", "")
    if not raw:
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
        if st.state == "Z" and any(thread_state(pid, t) not in ("Z", "X", "x") for t in threads(pid)[1:]):
            raise TrackerError(
                f"pid {pid}: its main thread exited (pthread_exit) while other threads run on: such a process is "
                "not supported (CRIU cannot dump it either)", pid=pid, errno=errno.ESRCH,
            )
        raise TargetExited(f"target {pid} exited", pid=pid, errno=errno.ESRCH)
    return st


def threads(pid: int) -> list[int]:
    """Thread ids of ``pid``, the main thread first."""
    tids = sorted(int(t) for t in list_proc(pid, "task"))
    tids.sort(key=lambda t: t != pid)
    return tids


def thread_state(pid: int, tid: int) -> str:
    """One-letter scheduler state of a thread, or 'X' if it is gone."""
    raw = read_proc_text(pid, f"task/{tid}/stat", "")
    if not raw:
        return "X"
    return raw[raw.rindex(")") + 2]


STOPPED = ("T", "t")  # a group stop or a ptrace stop


def thread_states(pid: int) -> list[str]:
    """The state of each thread of ``pid`` ('X' for one that exited meanwhile)."""
    return [thread_state(pid, t) for t in threads(pid)]


def all_stopped(pid: int) -> bool:
    """Every thread of ``pid`` is stopped (threads that exited meanwhile aside; False when none is left)."""
    live = [s for s in thread_states(pid) if s != "X"]
    return bool(live) and all(s in STOPPED for s in live)


def pidfd_open(pid: int) -> int:
    """A pidfd for ``pid`` (close-on-exec)."""
    try:
        return os.pidfd_open(pid)
    except OSError as e:
        raise from_errno(e.errno or errno.EIO, pid, "pidfd_open") from None


def open_mapped_file(pid: int, start: int, end: int, dev: str, inode: int, path: str) -> int:
    """A read-only fd of the file mapped at [start, end) of ``pid``: /proc/PID/map_files, or, where that is
    closed to the caller (docs/kernel.md rule 31: EPERM without CAP_CHECKPOINT_RESTORE, also for one's own process),
    the mapping's path when it still names the very file mapped (same device and inode as in maps)."""
    try:
        return os.open(f"/proc/{pid}/map_files/{start:x}-{end:x}", os.O_RDONLY | os.O_CLOEXEC)  # OSError: callers
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
