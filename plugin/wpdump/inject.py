"""Syscall injection: create a userfaultfd inside an unmodified target and take it with pidfd_getfd.

One thread is seized and interrupted; its registers are saved; each syscall is run by pointing the
instruction pointer at an existing syscall instruction (found in [vdso]) and single-stepping it, so
no target memory is written; the registers are restored and the thread detached on every path.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

from . import _native
from .errors import AccessDenied, NoSuchProcess, TargetExited, TrackerError, WpdumpError, from_errno
from .process import check_alive, thread_state, threads
from .uffd import UFFD_USER_MODE_ONLY

ffi, lib = _native.ffi, _native.lib
PTRACE_EVENT_STOP = 128


def _syscall_insn() -> bytes:
    buf = ffi.new("unsigned char[16]")
    n = lib.wpd_syscall_insn(buf, 16)
    return bytes(ffi.buffer(buf, n))


def find_syscall_insn(pid: int) -> int:
    """Address of a syscall instruction in the target: in [vdso], else in any executable mapping."""
    insn = _syscall_insn()
    candidates: list[tuple[int, int, bool]] = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            if "x" not in fields[1]:
                continue
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            name = fields[5] if len(fields) > 5 else ""
            if name in ("[vsyscall]",):  # emulated: not executable from user space
                continue
            candidates.append((lo, hi, name == "[vdso]"))
    candidates.sort(key=lambda c: not c[2])
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for lo, hi, _ in candidates:
            try:
                data = os.pread(mem.fileno(), min(hi - lo, 1 << 20), lo)
            except OSError:
                continue
            at = data.find(insn)
            if at >= 0:
                return lo + at
    raise TrackerError(f"pid {pid}: no syscall instruction found in executable memory", pid=pid)


class _Seized:
    """A seized, stopped thread with its saved registers."""

    def __init__(self, pid: int, tid: int) -> None:
        self.pid, self.tid = pid, tid
        self.saved = ffi.new("char[]", lib.wpd_regs_size())
        self.work = ffi.new("char[]", lib.wpd_regs_size())
        self.pending_signal = 0
        self.insn_addr = 0
        self.insn_len = len(_syscall_insn())

    def wait_stop(self) -> int:
        st = ffi.new("int *")
        r = lib.wpd_waitpid(self.tid, st)
        if r < 0:
            raise from_errno(r, self.pid, "wait for the seized thread")
        status = st[0]
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            raise TargetExited(f"target {self.pid} exited during attach", pid=self.pid, errno=errno.ESRCH)
        return status

    def syscall(self, nr: int, *args: int) -> int:
        """Run one syscall in the thread; returns its raw result (negative errno on failure)."""
        a = list(args) + [0] * (6 - len(args))
        lib.wpd_regs_prepare_syscall(self.work, self.insn_addr, nr, *a)
        # prepare_syscall started from a copy of the saved registers
        r = lib.wpd_regs_set(self.tid, self.work)
        if r < 0:
            raise from_errno(r, self.pid, "set registers")
        done_ip = self.insn_addr + self.insn_len
        for _ in range(64):
            r = lib.wpd_ptrace_singlestep(self.tid, 0)
            if r < 0:
                raise from_errno(r, self.pid, "single-step")
            status = self.wait_stop()
            sig = os.WSTOPSIG(status)
            event = status >> 16
            if event == 0 and sig != signal.SIGTRAP:
                self.pending_signal = sig  # a real signal arrived: deliver it at detach
            r = lib.wpd_regs_get(self.tid, self.work)
            if r < 0:
                raise from_errno(r, self.pid, "get registers")
            if lib.wpd_regs_ip(self.work) == done_ip:
                result = int(lib.wpd_regs_syscall_result(self.work))
                ffi.memmove(self.work, self.saved, lib.wpd_regs_size())
                return result
            ffi.memmove(self.work, self.saved, lib.wpd_regs_size())
            lib.wpd_regs_prepare_syscall(self.work, self.insn_addr, nr, *a)
            r = lib.wpd_regs_set(self.tid, self.work)
            if r < 0:
                raise from_errno(r, self.pid, "set registers")
        raise TrackerError(f"pid {self.pid}: injected syscall {nr} did not complete", pid=self.pid)


def _pick_thread(pid: int) -> int:
    for tid in threads(pid):
        if thread_state(pid, tid) not in ("Z", "X", "x"):
            return tid
    raise TargetExited(f"target {pid} has no live thread", pid=pid, errno=errno.ESRCH)


def _tracer_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@contextmanager
def seized(pid: int) -> Iterator[_Seized]:
    """Seize and stop one live thread of ``pid``; restore its registers and detach on exit."""
    check_alive(pid)
    tid = _pick_thread(pid)
    r = lib.wpd_ptrace_seize(tid)
    if r == -errno.EPERM and _tracer_of(pid):
        raise AccessDenied(
            f"pid {pid} is already traced by pid {_tracer_of(pid)} (a debugger?)", pid=pid, errno=-r
        )
    if r < 0:
        raise from_errno(r, pid, "ptrace")
    th = _Seized(pid, tid)
    stopped = False
    try:
        r = lib.wpd_ptrace_interrupt(tid)
        if r < 0:
            raise from_errno(r, pid, "interrupt")
        status = th.wait_stop()
        stopped = True
        if status >> 16 == 0 and os.WSTOPSIG(status) != signal.SIGTRAP:
            th.pending_signal = os.WSTOPSIG(status)
        r = lib.wpd_regs_get(tid, th.saved)
        if r < 0:
            raise from_errno(r, pid, "get registers")
        ffi.memmove(th.work, th.saved, lib.wpd_regs_size())
        yield th
    finally:
        if stopped:
            lib.wpd_regs_set(tid, th.saved)
        lib.wpd_ptrace_detach(tid, th.pending_signal)


def open_userfaultfd(pid: int, pidfd: int) -> int:
    """Create a userfaultfd in ``pid``, take it into this process, close the target's copy."""
    with seized(pid) as th:
        th.insn_addr = find_syscall_insn(pid)
        base = os.O_CLOEXEC | os.O_NONBLOCK
        remote = th.syscall(lib.wpd_nr_userfaultfd(), base)
        if remote == -errno.EPERM:
            # docs/kernel.md rule 8b: unprivileged targets need UFFD_USER_MODE_ONLY
            remote = th.syscall(lib.wpd_nr_userfaultfd(), base | UFFD_USER_MODE_ONLY)
        if remote < 0:
            raise from_errno(remote, pid, "userfaultfd() in the target")
        try:
            local = lib.wpd_pidfd_getfd(pidfd, remote)
            if local < 0:
                raise from_errno(local, pid, "pidfd_getfd")
        finally:
            # docs/kernel.md rule 10: the target must not keep a copy, or a tracker death leaves it protected
            r = th.syscall(lib.wpd_nr_close(), remote)
        if r < 0:
            os.close(local)
            raise from_errno(r, pid, "close() in the target")
        return local


def pidfd_open(pid: int) -> int:
    """A pidfd for ``pid`` (ESRCH → NoSuchProcess)."""
    fd = lib.wpd_pidfd_open(pid)
    if fd < 0:
        if fd == -errno.ESRCH:
            raise NoSuchProcess(f"no such process: {pid}", pid=pid, errno=-fd)
        raise from_errno(fd, pid, "pidfd_open")
    return fd


__all__ = ["open_userfaultfd", "pidfd_open", "seized", "find_syscall_insn", "WpdumpError"]
