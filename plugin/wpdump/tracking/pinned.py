"""Buffers the kernel may write without the tracker seeing it: pages pinned for I/O before a harvest.

A direct I/O read (O_DIRECT, FUSE direct_io, network filesystems) pins its buffer's pages when it starts
and writes them through the kernel's own mapping when the data arrives. A pin taken while a page is
write-protected counts as a write (the pin faults), but a pin taken *before* a harvest re-protects the
page is followed by a write that nothing reports (docs/kernel.md rules 7, 33). So a thread blocked in a read-like
syscall at a harvest has its buffer copied at that harvest and again at the next one, by which time the
read has completed or is still blocked (and is copied again). Asynchronous I/O (AIO, io_uring without fixed
buffers) does not show its buffers: it is named in a warning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from .. import ranges
from ..errors import WpdumpError
from ..ranges import PAGE
from ..target import procfds
from ..target.process import open_proc, read_proc_text

# Syscall numbers as /proc/PID/task/TID/syscall shows them (injected syscalls: native/arch_*.h).
_SYSCALLS = {
    "x86_64": {
        "read": 0, "pread64": 17, "readv": 19, "preadv": 295, "preadv2": 327,
        "io_getevents": 208, "io_submit": 209, "io_pgetevents": 333, "io_uring_enter": 426,
    },
}
_NR = _SYSCALLS.get(os.uname().machine, {})
_BUF_READS = {_NR[n] for n in ("read", "pread64") if n in _NR}
_IOV_READS = {_NR[n] for n in ("readv", "preadv", "preadv2") if n in _NR}
_ASYNC = {_NR[n]: n for n in ("io_getevents", "io_submit", "io_pgetevents", "io_uring_enter") if n in _NR}
IOV_MAX = 1024
# Filesystems that may serve a read without the page cache although the file was not opened O_DIRECT.
_UNCACHED_FS = ("fuse", "fuseblk", "virtiofs", "nfs", "nfs4", "cifs", "smb3", "9p", "ceph", "orangefs", "gfs2")
O_DIRECT = os.O_DIRECT


@dataclass
class InFlight:
    """Buffers of reads in flight at one harvest (n×2 page ranges) and what could not be known."""

    ranges: np.ndarray = field(default_factory=lambda: ranges.EMPTY.copy())
    warnings: list[str] = field(default_factory=list)


def _thread_syscall(pid: int, tid: int) -> list[int] | None:
    """[nr, arg0..arg5] of a thread blocked in a syscall, else None (running, not in a syscall, gone)."""
    words = read_proc_text(pid, f"task/{tid}/syscall", "").split()
    if len(words) < 7 or not words[0].isdigit():
        return None  # "running", or "-1 sp pc" (blocked outside a syscall)
    return [int(words[0])] + [int(w, 16) for w in words[1:7]]


def _fs_types(pid: int) -> dict[int, str]:
    """mount id -> filesystem type for the mounts the target sees."""
    out: dict[int, str] = {}
    try:
        for line in read_proc_text(pid, "mountinfo", "").splitlines():
            parts = line.split()
            out[int(parts[0])] = parts[parts.index("-") + 1]
    except (ValueError, IndexError):
        pass
    return out


class _FdKinds:
    """Which fds of the target a read may pin, from fdinfo and mountinfo alone: a stat() of a file on a
    FUSE mount would ask its server, which may be the very thing that is slow."""

    def __init__(self, pid: int, fds: dict[int, str]) -> None:
        self.pid, self.fds = pid, fds
        self._fs: dict[int, str] | None = None

    def may_pin(self, fd: int) -> bool:
        what = self.fds.get(fd)
        if what is None or what.startswith(("socket:", "pipe:", "anon_inode:")):
            return False  # copied through the page tables: reported like any write (rule 9)
        info = dict(line.split(":", 1) for line in procfds.fdinfo(self.pid, fd).splitlines() if ":" in line)
        try:
            flags, mnt_id = int(info["flags"].strip(), 8), int(info["mnt_id"].strip())
        except (KeyError, ValueError):
            return False  # closed meanwhile
        if flags & O_DIRECT:
            return True
        if self._fs is None:
            self._fs = _fs_types(self.pid)
        fs = self._fs.get(mnt_id, "")
        return fs == "devtmpfs" or fs.split(".")[0] in _UNCACHED_FS  # devices: a driver may pin


def _iovecs(pid: int, addr: int, count: int) -> list[tuple[int, int]]:
    """The (base, len) pairs of an iovec array in the target's memory."""
    count = min(count, IOV_MAX)
    try:
        fd = open_proc(pid, "mem")
    except WpdumpError:
        return []
    try:
        raw = os.pread(fd, 16 * count, addr)
    except OSError:
        return []
    finally:
        os.close(fd)
    arr = np.frombuffer(raw[: len(raw) // 16 * 16], dtype="<u8").reshape(-1, 2)
    return [(int(b), int(n)) for b, n in arr if n]


def _page_span(base: int, length: int) -> tuple[int, int]:
    return base & ~(PAGE - 1), (base + length + PAGE - 1) & ~(PAGE - 1)


def in_flight(pid: int, tids: list[int], fds: dict[int, str]) -> InFlight:
    """Buffers of the threads of ``pid`` blocked in a read-like syscall on an fd that may pin pages."""
    res = InFlight()
    kinds = _FdKinds(pid, fds)
    spans: list[tuple[int, int]] = []
    for tid in tids:
        sc = _thread_syscall(pid, tid)
        if sc is None:
            continue
        nr, fd = sc[0], sc[1]
        if nr in _ASYNC:
            res.warnings.append(
                f"pid {pid}: thread {tid} waits in {_ASYNC[nr]}: buffers of its asynchronous I/O are not known, "
                "and what that I/O writes into them after this iteration may be missing from the next"
            )
            continue
        if nr not in _BUF_READS and nr not in _IOV_READS:
            continue
        if not kinds.may_pin(fd):
            continue
        if nr in _BUF_READS:
            spans.append(_page_span(sc[2], sc[3]))
        else:
            spans.extend(_page_span(b, n) for b, n in _iovecs(pid, sc[2], sc[3]))
    res.ranges = ranges.merge(ranges.from_pairs([s for s in spans if s[0] < s[1]]))
    return res
