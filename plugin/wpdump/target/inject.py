"""Syscall injection: create a userfaultfd inside an unmodified target and take it with pidfd_getfd.

The ptrace agent (agent.py) runs each syscall in a seized thread at an existing syscall instruction (found in
[vdso]), so no target memory is written; ptrace.py says how the thread is left exactly as it was.
"""

from __future__ import annotations

import errno
import os

from ..errors import TrackerError, from_errno
from .native import check, ffi, lib
from .process import open_proc, pidfd_open
from .ptrace import Seizure
from .uffd import UFFD_USER_MODE_ONLY
from .vmas import read_maps


def _syscall_insn() -> bytes:
    buf = ffi.new("unsigned char[16]")
    n = lib.wpd_syscall_insn(buf, 16)
    return bytes(ffi.buffer(buf, n))


def find_syscall_insn(pid: int) -> int:
    """Address of a syscall instruction in the target: in [vdso], else in any executable mapping."""
    insn = _syscall_insn()
    # [vsyscall] is emulated: not executable from user space
    candidates = [(v.start, v.end, v.path == "[vdso]") for v in read_maps(pid)
                  if "x" in v.perms and v.path != "[vsyscall]"]
    candidates.sort(key=lambda c: not c[2])
    mem = open_proc(pid, "mem")
    try:
        for lo, hi, _ in candidates:
            try:
                data = os.pread(mem, min(hi - lo, 1 << 20), lo)
            except OSError:
                continue
            at = data.find(insn)
            if at >= 0:
                return lo + at
    finally:
        os.close(mem)
    raise TrackerError(f"pid {pid}: no syscall instruction found in executable memory", pid=pid)


def inject_userfaultfd(sz: Seizure) -> int:
    """(In the agent.) Create a userfaultfd in the target, take it with pidfd_getfd, close the target's copy."""
    pid = sz.pid
    th = sz.injector()
    th.begin()
    pidfd = -1
    try:
        th.insn, th.insn_len = find_syscall_insn(pid), len(_syscall_insn())
        pidfd = pidfd_open(pid)
        base = os.O_CLOEXEC | os.O_NONBLOCK
        remote = th.syscall(lib.wpd_nr_userfaultfd(), base)
        if remote == -errno.EPERM:
            # docs/kernel.md rule 8b: unprivileged targets need UFFD_USER_MODE_ONLY
            remote = th.syscall(lib.wpd_nr_userfaultfd(), base | UFFD_USER_MODE_ONLY)
        if remote < 0:
            raise from_errno(remote, pid, "userfaultfd() in the target")
        local = -1
        try:
            local = check(lib.wpd_pidfd_getfd(pidfd, remote), pid, "pidfd_getfd")
        finally:
            # docs/kernel.md rule 10: the target must not keep a copy, or a tracker death leaves it protected
            r = th.syscall(lib.wpd_nr_close(), remote)
            if r < 0 and local >= 0:
                os.close(local)
        if r < 0:
            raise from_errno(r, pid, "close() in the target")
        return local
    finally:
        if pidfd >= 0:
            os.close(pidfd)
        th.end()


def inject_madvise(sz: Seizure, ranges: list[tuple[int, int]], advice: int) -> list[tuple[int, int]]:
    """(In the agent.) madvise(advice) in the target on each range; returns the ranges where it failed."""
    th = sz.injector()
    th.begin()
    failed = []
    try:
        th.insn, th.insn_len = find_syscall_insn(sz.pid), len(_syscall_insn())
        for s, e in ranges:
            if th.syscall(lib.wpd_nr_madvise(), int(s), int(e - s), advice) < 0:
                failed.append((int(s), int(e)))
    finally:
        th.end()
    return failed
