"""Typed exceptions: each carries the target pid and the errno behind it."""

from __future__ import annotations

import errno as errno_mod
import os


class WpdumpError(Exception):
    """Base of wpdump's errors; ``pid`` and ``errno`` may be None when not applicable."""

    def __init__(self, message: str, *, pid: int | None = None, errno: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid
        self.errno = errno


class NoSuchProcess(WpdumpError):
    """The target pid does not exist (or no longer does)."""


class TargetExited(NoSuchProcess):
    """The target exited while it was tracked."""


class TargetExeced(WpdumpError):
    """The target called execve: the tracked memory was replaced by a new image."""


class AccessDenied(WpdumpError):
    """The caller may not ptrace or read the target."""


class KernelUnsupported(WpdumpError):
    """The running kernel lacks a feature wpdump needs; ``feature`` names it."""

    def __init__(self, feature: str, message: str | None = None, **kw: object) -> None:
        super().__init__(message or f"kernel lacks {feature} (Linux 6.7+ with userfaultfd WP needed)", **kw)
        self.feature = feature


class RangeBusy(WpdumpError):
    """The target registered its own userfaultfd on [start, end): that range cannot be tracked."""

    def __init__(self, start: int, end: int, path: str = "", **kw: object) -> None:
        where = f" ({path})" if path else ""
        super().__init__(
            f"pid {kw.get('pid')}: range {start:#x}-{end:#x}{where} is registered with the target's own "
            "userfaultfd; it is dumped whole every round",
            **kw,
        )
        self.start = start
        self.end = end


class AlreadyTracked(WpdumpError):
    """Another userfaultfd (a second tracker) write-protects VMAs of the target: two trackers would split
    its dirty bits between them, each missing the writes the other harvested."""


class TargetUsesUserfaultfd(WpdumpError):
    """The target holds a userfaultfd of its own: while tracked, its UFFDIO_REGISTER fails with EBUSY."""


class UnreadableMemory(WpdumpError):
    """Pages of a mapped VMA that can be read neither by process_vm_readv nor through /proc/PID/mem (e.g.
    memfd_secret): the iteration fails rather than leave them out of the image."""

    def __init__(self, start: int, end: int, vma: str = "", message: str | None = None, **kw: object) -> None:
        where = f" in {vma}" if vma else ""
        err = kw.get("errno")
        why = f": {os.strerror(err)}" if isinstance(err, int) else ""
        super().__init__(message or f"pid {kw.get('pid')}: cannot read {start:#x}-{end:#x}{where}{why}", **kw)
        self.start = start
        self.end = end


class ChainError(WpdumpError):
    """An images directory or its chain of parents is missing, corrupt, foreign or not this process's."""


class TrackerError(WpdumpError):
    """A kernel operation failed in a way none of the specific errors describes."""


def no_such_process(pid: int | None, err: int = errno_mod.ESRCH) -> NoSuchProcess:
    """The error for a pid that does not exist (or no longer does)."""
    return NoSuchProcess(f"no such process: {pid}", pid=pid, errno=err)


def from_errno(err: int, pid: int | None, what: str) -> WpdumpError:
    """Map a negative or positive errno from an operation on ``pid`` to the matching exception."""
    err = abs(err)
    text = f"pid {pid}: {what}: {os.strerror(err)}"
    if err == errno_mod.ESRCH:
        return no_such_process(pid, err)
    if err in (errno_mod.EPERM, errno_mod.EACCES):
        return AccessDenied(f"permission denied: cannot {what} pid {pid}", pid=pid, errno=err)
    return TrackerError(text, pid=pid, errno=err)


class ProtocolError(WpdumpError):
    """A migration stream broke CRIU's page-server protocol or wpdump's framing (untrusted input)."""


class MigrationError(WpdumpError):
    """A live migration failed; the source tree runs on (the message says why)."""
