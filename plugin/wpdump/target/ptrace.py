"""Seizing a target's threads with ptrace and running syscalls in one of them, leaving each thread as it was.

Runs inside the ptrace agent (agent.py), never in the wpdump command, except for the short pause around a harvest's
scan (freeze.Pause: seize, interrupt, detach; nothing of the thread is changed). A thread is stopped with PTRACE_SEIZE +
PTRACE_INTERRUPT: it traps in the kernel's signal code on its way to user space, where the kernel itself
restarts an interrupted syscall once the thread is detached (or its tracer dies). A syscall is run by pointing
the thread at an existing `syscall` instruction and resuming it with PTRACE_SYSCALL up to its syscall-exit stop:
no single-step, so no SIGTRAP is ever queued. Then the thread is trapped again (PTRACE_INTERRUPT) before its
registers go back, so it sits at the same kind of trap as before. Signals are blocked with PTRACE_SETSIGMASK
meanwhile: they stay queued and are delivered after the detach, none lost, none duplicated.
"""

from __future__ import annotations

import errno
import os
import signal
import time

from ..errors import AccessDenied, NoSuchProcess, TargetExited, TrackerError, from_errno
from .native import ffi, lib
from .process import all_stopped, is_kernel_thread, read_proc_text, read_stat, thread_state, threads

PTRACE_O_TRACESYSGOOD = 1
PTRACE_O_SUSPEND_SECCOMP = 1 << 21
PTRACE_EVENT_STOP = 128
SYSCALL_STOP = signal.SIGTRAP | 0x80
ALL_SIGNALS = (1 << 64) - 1
STOP_TIMEOUT = 10.0
VFORK_GRACE = 0.2
_YIELDS = 200  # polls of a stop with sched_yield before sleeping between them
# x86_64 syscalls that run under a temporary signal mask and put the caller's back on return
# (TIF_RESTORE_SIGMASK). PTRACE_SETSIGMASK clears that flag: the caller's mask would be lost, so a thread
# interrupted in one of them is not made to block signals (suppressed signals are queued again instead).
_MASK_SWAPPING = {130, 270, 271, 281, 333, 441}  # rt_sigsuspend pselect6 ppoll epoll_pwait io_pgetevents epoll_pwait2
# x86_64 syscalls that return -EINTR (not a restart code) when the thread is merely stopped or interrupted:
# epoll_wait, epoll_pwait, epoll_pwait2, rt_sigtimedwait (man 7 signal). Restarted when no signal caused it.
_EINTR_ON_STOP = {232, 281, 441, 128}
_VFORK, _CLONE, _CLONE3, _CLONE_VFORK = 58, 56, 435, 0x4000


class ThreadGone(Exception):
    """A seized thread exited (the process may live on)."""


def _status_field(pid: int, tid: int, name: str) -> str:
    for line in read_proc_text(pid, f"task/{tid}/status", "").splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return ""


def tracer_of(pid: int) -> int:
    v = _status_field(pid, pid, "TracerPid")
    return int(v) if v else 0


def in_vfork(pid: int, tid: int) -> bool:
    """True when the thread waits in vfork() (or clone(CLONE_VFORK)) for its child to exec or exit."""
    fields = read_proc_text(pid, f"task/{tid}/syscall", "").split()
    if not fields or not fields[0].isdigit():
        return False
    nr = int(fields[0])
    return nr in (_VFORK, _CLONE3) or (nr == _CLONE and len(fields) > 1 and int(fields[1], 16) & _CLONE_VFORK != 0)


class Thread:
    """One seized thread: stop it, run syscalls in it, detach it unchanged."""

    def __init__(self, pid: int, tid: int) -> None:
        self.pid, self.tid = pid, tid
        self.stopped = False
        self.saved = ffi.new("char[]", lib.wpd_regs_size())
        self.work = ffi.new("char[]", lib.wpd_regs_size())
        self.mask: int | None = None  # the thread's signal mask while we block all signals
        self.seccomp = False
        self.injecting = False
        self.insn = 0
        self.insn_len = 0
        self.resend: list[tuple[int, bytes]] = []  # signals suppressed meanwhile, queued again before detach

    def seize(self) -> None:
        r = lib.wpd_ptrace_seize(self.tid, PTRACE_O_TRACESYSGOOD)
        if r == -errno.ESRCH:
            raise ThreadGone
        if r == -errno.EPERM and thread_state(self.pid, self.tid) in ("Z", "X", "x"):
            raise ThreadGone  # a task that already exited is refused with EPERM (docs/kernel.md rule 34)
        if r == -errno.EPERM and tracer_of(self.pid):
            raise AccessDenied(f"pid {self.pid} is already traced by pid {tracer_of(self.pid)} (a debugger?)",
                               pid=self.pid, errno=-r)
        if r < 0:
            raise from_errno(r, self.pid, "ptrace")

    def _wait(self, timeout: float | None = None) -> int | None:
        st = ffi.new("int *")
        if timeout is None:
            r = lib.wpd_waitpid(self.tid, st, 0)
        else:
            deadline, delay, spins = time.monotonic() + timeout, 20e-6, 0
            while (r := lib.wpd_waitpid(self.tid, st, os.WNOHANG)) == 0:
                if time.monotonic() > deadline:
                    return None
                if spins < _YIELDS:  # a stop takes tens of µs; a sleep here lasts 60+ µs (timer slack)
                    spins += 1
                    os.sched_yield()  # and lets the thread run if it waits for our CPU
                    continue
                time.sleep(delay)
                delay = min(delay * 2, 0.005)
        if r == -errno.ECHILD:
            self.stopped = False
            raise ThreadGone
        if r < 0:
            raise from_errno(r, self.pid, "wait for a seized thread")
        if os.WIFEXITED(st[0]) or os.WIFSIGNALED(st[0]):
            self.stopped = False
            raise ThreadGone
        return st[0]

    def _check(self, r: int, what: str) -> None:
        if r == -errno.ESRCH:
            self.stopped = False
            raise ThreadGone
        if r < 0:
            raise from_errno(r, self.pid, what)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Interrupt the thread and wait until it traps. A signal it was about to take is delivered first, as
        the kernel would have (the interrupt stays pending)."""
        self.interrupt()
        deadline = time.monotonic() + timeout
        while not self.wait_stop(VFORK_GRACE):
            if in_vfork(self.pid, self.tid):
                raise TrackerError(f"pid {self.pid}: thread {self.tid} waits in vfork() until its child execs or "
                                   "exits; try again then", pid=self.pid, errno=errno.EBUSY)
            if time.monotonic() > deadline:
                raise TrackerError(f"pid {self.pid}: thread {self.tid} did not stop within {timeout:.0f} s "
                                   f"(state {thread_state(self.pid, self.tid)})", pid=self.pid,
                                   errno=errno.ETIMEDOUT)

    def interrupt(self) -> None:
        self._check(lib.wpd_ptrace_interrupt(self.tid), "interrupt")

    def wait_stop(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the trap of :meth:`interrupt`, delivering a signal the thread takes
        first as the kernel would have (the interrupt stays pending); False if it has not trapped yet."""
        deadline = time.monotonic() + timeout
        while True:
            status = self._wait(max(0.0, deadline - time.monotonic()))
            if status is None:
                return False
            if status >> 16 == PTRACE_EVENT_STOP:
                self.stopped = True
                self._undo_eintr()
                return True
            self._check(lib.wpd_ptrace_cont(self.tid, os.WSTOPSIG(status)), "resume")

    def _undo_eintr(self) -> None:
        """A thread our interrupt knocked out of epoll_wait/sigtimedwait with EINTR is pointed back at the call
        (it runs again, its timeout from the start), unless a signal it takes is pending (that one caused it)."""
        regs = self.work
        if lib.wpd_regs_get(self.tid, regs) < 0:
            return
        if lib.wpd_regs_syscall_nr(regs) not in _EINTR_ON_STOP or lib.wpd_regs_syscall_result(regs) != -errno.EINTR:
            return
        pending = int(_status_field(self.pid, self.tid, "SigPnd") or "0", 16)
        pending |= int(_status_field(self.pid, self.tid, "ShdPnd") or "0", 16)
        if pending & ~int(_status_field(self.pid, self.tid, "SigBlk") or "0", 16):
            return
        lib.wpd_regs_restart_syscall(regs)
        self._check(lib.wpd_regs_set(self.tid, regs), "set registers")

    def _suppress(self, sig: int) -> None:
        info = ffi.new("char[128]")
        lib.wpd_ptrace_getsiginfo(self.tid, info)
        self.resend.append((sig, bytes(ffi.buffer(info))))

    def begin(self) -> None:
        """Save the thread's registers, block its signals and (under seccomp) suspend its filters; then
        :meth:`syscall` runs syscalls at the `syscall` instruction at ``self.insn``."""
        r = lib.wpd_regs_get(self.tid, self.saved)
        if r == -errno.ENOEXEC:
            raise TrackerError(f"pid {self.pid}: 32-bit processes are not supported", pid=self.pid, errno=-r)
        self._check(r, "get registers")
        res = lib.wpd_regs_syscall_result(self.saved)
        nr = lib.wpd_regs_syscall_nr(self.saved)
        swapping = nr in _MASK_SWAPPING and (-4095 <= res < 0 or res == nr)  # (== nr: restarted by _undo_eintr)
        self.injecting = True
        if not swapping:
            mask = ffi.new("uint64_t *")
            self._check(lib.wpd_ptrace_getsigmask(self.tid, mask), "get the signal mask")
            self._check(lib.wpd_ptrace_setsigmask(self.tid, ALL_SIGNALS), "block signals")
            self.mask = int(mask[0])
        mode = _status_field(self.pid, self.tid, "Seccomp")
        if mode not in ("", "0"):
            # An injected userfaultfd() must not meet the target's filter: it may kill the target, trap into
            # its SIGSYS handler or return an errno. CRIU suspends seccomp the same way (needs CAP_SYS_ADMIN).
            r = lib.wpd_ptrace_setoptions(self.tid, PTRACE_O_TRACESYSGOOD | PTRACE_O_SUSPEND_SECCOMP)
            if r < 0:
                kind = "strict mode" if mode == "1" else "a filter"
                raise AccessDenied(
                    f"pid {self.pid} runs under seccomp ({kind}): wpdump needs CAP_SYS_ADMIN to suspend it for the "
                    f"injected userfaultfd() (PTRACE_O_SUSPEND_SECCOMP: {os.strerror(-r)})", pid=self.pid, errno=-r)
            self.seccomp = True

    def syscall(self, nr: int, *args: int) -> int:
        """Run one syscall in the thread; returns its raw result (negative errno on failure)."""
        assert self.injecting
        a = list(args) + [0] * (6 - len(args))
        ffi.memmove(self.work, self.saved, lib.wpd_regs_size())
        lib.wpd_regs_prepare_syscall(self.work, self.insn, nr, *a)
        self._check(lib.wpd_regs_set(self.tid, self.work), "set registers")
        entered = False
        while True:
            self._check(lib.wpd_ptrace_syscall(self.tid, 0), "resume")
            status = self._wait()
            sig, event = os.WSTOPSIG(status), status >> 16
            if event == 0 and sig == SYSCALL_STOP:
                if entered:
                    break
                entered = True
            elif event == 0:  # a signal the mask does not block (SIGSTOP), or any while not blocking
                self._suppress(sig)
        self._check(lib.wpd_regs_get(self.tid, self.work), "get registers")
        if lib.wpd_regs_ip(self.work) != self.insn + self.insn_len:
            raise TrackerError(f"pid {self.pid}: injected syscall {nr} did not complete", pid=self.pid)
        return int(lib.wpd_regs_syscall_result(self.work))

    def end(self) -> None:
        """Trap the thread again in the signal code, put its registers and mask back, queue suppressed signals."""
        if not self.injecting:
            return
        self._check(lib.wpd_ptrace_interrupt(self.tid), "interrupt")
        self._check(lib.wpd_ptrace_cont(self.tid, 0), "resume")
        while (status := self._wait()) >> 16 != PTRACE_EVENT_STOP:
            if os.WSTOPSIG(status) != SYSCALL_STOP:
                self._suppress(os.WSTOPSIG(status))
            self._check(lib.wpd_ptrace_cont(self.tid, 0), "resume")
        self._check(lib.wpd_regs_set(self.tid, self.saved), "restore registers")
        if self.seccomp:
            lib.wpd_ptrace_setoptions(self.tid, PTRACE_O_TRACESYSGOOD)
            self.seccomp = False
        for sig, info in self.resend:  # with its siginfo where the kernel lets us (si_code < 0), else as tgkill
            if lib.wpd_rt_tgsigqueueinfo(self.pid, self.tid, sig, ffi.from_buffer(info)) < 0:
                lib.wpd_tgkill(self.pid, self.tid, sig)
        self.resend.clear()
        if self.mask is not None:
            self._check(lib.wpd_ptrace_setsigmask(self.tid, self.mask), "restore the signal mask")
            self.mask = None
        self.injecting = False

    def detach(self) -> None:
        if self.stopped:
            lib.wpd_ptrace_detach(self.tid, 0)
            self.stopped = False

    def detach_or_reap(self, timeout: float = STOP_TIMEOUT) -> None:
        """Detach a stopped thread; one killed meanwhile is reaped as its tracer must (a traced zombie waits for
        its tracer's wait before its real parent learns of it). For a tracer that lives on (freeze.Pause)."""
        if not self.stopped:
            return
        self.stopped = False
        if lib.wpd_ptrace_detach(self.tid, 0) != -errno.ESRCH:
            return
        self.stopped = True
        try:
            while self._wait(timeout) is not None:  # a stop on its way out (PTRACE_EVENT_EXIT is not asked)
                if lib.wpd_ptrace_detach(self.tid, 0) != -errno.ESRCH:
                    break
        except ThreadGone:
            pass
        self.stopped = False


class Seizure:
    """The seized threads of one target: one (to inject syscalls) or all (a freeze)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.threads: dict[int, Thread] = {}
        st = read_stat(pid)
        if st.state in ("Z", "X", "x"):
            raise TargetExited(f"target {pid} exited", pid=pid, errno=errno.ESRCH)
        if is_kernel_thread(pid):
            raise AccessDenied(f"pid {pid} is a kernel thread ({st.comm}): it has no user memory to checkpoint",
                               pid=pid, errno=errno.EPERM)
        self.was_stopped = all_stopped(pid)

    def _seize(self, tid: int) -> Thread | None:
        th = Thread(self.pid, tid)
        try:
            th.seize()
            self.threads[tid] = th
            th.stop()
        except ThreadGone:
            self.threads.pop(tid, None)
            self._check_alive()
            return None
        return th

    def _check_alive(self) -> None:
        try:
            if read_stat(self.pid).state not in ("Z", "X", "x"):
                return
        except NoSuchProcess:
            pass
        raise TargetExited(f"target {self.pid} exited", pid=self.pid, errno=errno.ESRCH)

    def seize_one(self) -> None:
        """Seize and stop one live thread (one not waiting in vfork, when there is one)."""
        tids = [t for t in threads(self.pid) if thread_state(self.pid, t) not in ("Z", "X", "x")]
        tids.sort(key=lambda t: in_vfork(self.pid, t))
        for i, tid in enumerate(tids):
            try:
                if self._seize(tid) is not None:
                    return
            except TrackerError:
                if i == len(tids) - 1:
                    raise
                self.release()
        raise TargetExited(f"target {self.pid} has no live thread", pid=self.pid, errno=errno.ESRCH)

    def seize_all(self) -> None:
        """Seize and stop every thread, again until no new thread appeared meanwhile."""
        while True:
            new = [t for t in threads(self.pid) if t not in self.threads and thread_state(self.pid, t) not in "ZXx"]
            if not new:
                return
            for tid in new:
                self._seize(tid)

    def injector(self) -> Thread:
        """A stopped thread to run syscalls in."""
        for th in self.threads.values():
            if th.stopped:
                return th
        raise TargetExited(f"target {self.pid} has no live thread", pid=self.pid, errno=errno.ESRCH)

    def release(self, leave_stopped: bool = False) -> None:
        """Detach every thread; ``leave_stopped``: in a group stop (state T) afterwards."""
        stop = leave_stopped and not self.was_stopped and any(th.stopped for th in self.threads.values())
        if stop:
            try:
                os.kill(self.pid, signal.SIGSTOP)  # queued now, taken by the first thread to resume
            except ProcessLookupError:
                stop = False
        for th in self.threads.values():
            try:
                th.end()
            except (ThreadGone, TrackerError, NoSuchProcess):
                pass
            th.detach()
        self.threads.clear()
        if stop or self.was_stopped:  # a detached thread runs a moment (R) to re-enter the group stop
            deadline = time.monotonic() + STOP_TIMEOUT
            try:
                while time.monotonic() < deadline and not all(
                        thread_state(self.pid, t) in "TtXZ" for t in threads(self.pid)):
                    time.sleep(0.0005)
            except NoSuchProcess:
                pass
