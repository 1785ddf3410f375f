"""Freezing a target: every thread seized and interrupted by a ptrace agent (as CRIU freezes), and resuming it.

A ptrace freeze is undone by the kernel when the freezer dies (tracees resume), involves no group stop (the
target's parent sees no CLD_STOPPED/CLD_CONTINUED), works on a pid namespace's init (which ignores SIGSTOP) and
keeps an already stopped target stopped. ``stop``/``cont`` (SIGSTOP/SIGCONT) remain for tools/bench.
"""

from __future__ import annotations

import errno
import os
import signal
import time

from ..errors import NoSuchProcess, TrackerError, WpdumpError, no_such_process
from .agent import Agent
from .native import ffi, lib
from .process import all_stopped, thread_state, thread_states, threads
from .ptrace import STOP_TIMEOUT, Thread, ThreadGone
from .tree import Member, read_tree

_active: dict[int, Freezer] = {}


class Freezer:
    """``pid`` frozen by a ptrace agent until :meth:`thaw` (or this process's death); ``agent``: one that
    freezes a whole tree, thawed with it (:class:`TreeFreezer`)."""

    def __init__(self, pid: int, agent: Agent | None = None) -> None:
        t0 = time.perf_counter()
        self.pid = pid
        self.own = agent is None
        self.agent = Agent(pid, all_threads=True) if agent is None else agent
        self.seconds = time.perf_counter() - t0
        _active[pid] = self

    def thaw(self, leave_stopped: bool = False) -> None:
        """Resume the target (``leave_stopped``: leave it in a group stop, state T); idempotent."""
        if _active.get(self.pid) is self:
            del _active[self.pid]
        if not self.own:
            return
        try:
            self.agent.release(leave_stopped)
        finally:
            self.agent.close()

    def rseq_areas(self) -> list[tuple[int, int]]:
        return self.agent.rseq_areas(self.pid)

    def madvise(self, ranges: list[tuple[int, int]], advice: int) -> list[tuple[int, int]]:
        return self.agent.madvise(ranges, advice, self.pid)

    def __enter__(self) -> Freezer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.thaw()


class TreeFreezer:
    """Every process of the tree rooted at ``root`` frozen by one ptrace agent. The tree is read again after each
    round of seizing until no new process appears, so a fork racing the freeze is caught (as CRIU does)."""

    def __init__(self, root: int, single: bool = False) -> None:
        t0 = time.perf_counter()
        self.root = root
        self.agent: Agent | None = None
        self.frozen: dict[int, Freezer] = {}
        try:
            while True:
                members = read_tree(root, single)
                new = [m for m in members if m.pid not in self.frozen]
                if not new:
                    break
                for m in new:
                    if self.agent is None:
                        self.agent = Agent(m.pid, all_threads=True)  # the root: its failure is the freeze's
                    else:
                        try:
                            self.agent.seize(m.pid, all_threads=True)
                        except NoSuchProcess:  # exited before it could be seized: not part of the tree any more
                            continue
                    self.frozen[m.pid] = Freezer(m.pid, self.agent)
        except BaseException:
            self.thaw()
            raise
        self.members: list[Member] = [m for m in members if m.pid in self.frozen]
        self.seconds = time.perf_counter() - t0

    def thaw(self, leave_stopped: bool = False) -> None:
        """Resume every process (``leave_stopped``: each left in a group stop); idempotent."""
        for f in self.frozen.values():
            f.thaw()
        self.frozen = {}
        if self.agent is not None:
            ag, self.agent = self.agent, None
            try:
                ag.release(leave_stopped)
            finally:
                ag.close()

    def __enter__(self) -> TreeFreezer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.thaw()


def running_threads(pid: int) -> list[int]:
    """The threads of ``pid`` in state R (on a CPU or waiting for one); [] once it is gone."""
    try:
        return [t for t in threads(pid) if thread_state(pid, t) == "R"]
    except NoSuchProcess:
        return []


class Pause:
    """The threads of ``pid`` that are running (state R), stopped by this very thread for a moment: a harvest's
    re-protecting scan then sends no TLB-flush interrupt to their CPUs (docs/kernel.md rule 37).

    PTRACE_SEIZE + PTRACE_INTERRUPT, then PTRACE_DETACH; no agent: nothing of a thread is changed (a thread our
    interrupt knocked out of epoll_wait is pointed back at the call, as a freeze does), so this process dying
    mid-pause resumes them as a detach would (rule 29). :meth:`stop` does not wait for the traps: a thread on a
    CPU traps within tens of µs, one waiting for a CPU traps when it gets one and runs no code of its own
    meanwhile; :meth:`resume` collects them. Sleeping threads are left alone (they hold no CPU), and so is a
    thread that cannot be seized (traced by someone else, exiting): the pause is a speed-up, never a condition.
    Used from one thread only (ptrace requests come from the tracer thread).
    """

    GRACE = 0.005  # a thread not trapped by then (it entered vfork) lets the others go first

    def __init__(self, pid: int, max_threads: int = 64) -> None:
        self.pid = pid
        self.max_threads = max_threads
        self.seized: list[Thread] = []
        self.since = 0.0
        self.stalls: list[float] = []  # seconds of each pause, from the first interrupt to the last detach

    def stop(self) -> int:
        """Interrupt the running threads; returns how many (0: none ran, or too many to be worth it)."""
        _reap_leftovers()
        running = running_threads(self.pid)
        if not running or len(running) > self.max_threads:
            return 0
        self.since = time.perf_counter()
        for tid in running:
            th = Thread(self.pid, tid)
            try:
                th.seize()
            except (ThreadGone, WpdumpError):
                continue
            self.seized.append(th)
            try:
                th.interrupt()
            except (ThreadGone, WpdumpError):
                pass  # exiting: reaped by resume
        return len(self.seized)

    def resume(self) -> float:
        """Collect the traps and detach (the threads run on); returns the seconds of the pause (0: none)."""
        if not self.seized:
            return 0.0
        seized, self.seized = self.seized, []
        stopped, late = [], []
        for th in seized:
            try:
                (stopped if th.wait_stop(self.GRACE) else late).append(th)
            except ThreadGone:
                pass
            except WpdumpError:
                late.append(th)
        for th in stopped[:-1]:
            th.detach_or_reap()
        # the last detach may wake its thread onto this CPU and let it run first: the pause ends as it starts
        took = time.perf_counter() - self.since
        if stopped:
            stopped[-1].detach_or_reap()
        self.stalls.append(took)
        if late:
            self._detach_late(late)
        return took

    def _detach_late(self, late: list[Thread]) -> None:
        """Detach threads that had not trapped (e.g. one that entered vfork() just before the interrupt traps
        when its child execs) as they trap; a ptrace-stopped thread can only be detached once it has."""
        deadline = time.monotonic() + STOP_TIMEOUT
        for th in late:
            try:
                while not th.wait_stop(0.05):
                    if thread_state(self.pid, th.tid) in ("Z", "X"):
                        _leftovers.add(th.tid)  # exited, still traced by us: reaped when it can be
                        break
                    if time.monotonic() > deadline:
                        raise TrackerError(
                            f"pid {self.pid}: thread {th.tid} paused for a harvest did not stop within "
                            f"{STOP_TIMEOUT:.0f} s (state {thread_state(self.pid, th.tid)}); it resumes when this "
                            "process exits", pid=self.pid, errno=errno.ETIMEDOUT)
                else:
                    th.detach_or_reap()
            except ThreadGone:
                continue

    def __enter__(self) -> Pause:
        return self

    def __exit__(self, *exc: object) -> None:
        self.resume()


_leftovers: set[int] = set()  # threads that exited while paused and could not be reaped yet


def _reap_leftovers() -> None:
    """Reap what a pause left traced: a traced zombie stays one to its real parent until its tracer waits."""
    st = ffi.new("int *")
    for tid in list(_leftovers):
        if lib.wpd_waitpid(tid, st, os.WNOHANG) != 0:  # reaped, or not ours any more (ECHILD)
            _leftovers.discard(tid)


def active(pid: int) -> Freezer | None:
    """The freezer holding ``pid`` in this process, if any (syscalls are injected through it)."""
    return _active.get(pid)


def _send(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        raise no_such_process(pid) from None


def stop(pid: int, timeout: float = 5.0) -> float:
    """SIGSTOP ``pid`` and wait until all its threads are stopped ('T'); returns the seconds it took."""
    t0 = time.perf_counter()
    _send(pid, signal.SIGSTOP)
    deadline = t0 + timeout
    spins = 0
    while True:
        if all_stopped(pid):
            return time.perf_counter() - t0
        if all(s == "X" for s in thread_states(pid)):
            raise no_such_process(pid)
        if time.perf_counter() > deadline:
            raise TrackerError(f"pid {pid} did not stop within {timeout} s", pid=pid, errno=errno.ETIMEDOUT)
        spins += 1
        if spins > 100:  # busy-poll first (stopping takes tens of µs), then back off
            time.sleep(0.0005)


def cont(pid: int) -> None:
    """Resume a target stopped with :func:`stop`."""
    _send(pid, signal.SIGCONT)


def open_userfaultfd(pid: int, pidfd: int = -1) -> int:
    """A userfaultfd created inside ``pid`` and taken into this process; the target keeps no copy.

    Injected by the freezing agent when ``pid`` is frozen, else by an agent that seizes one thread for it."""
    fr = active(pid)
    if fr is not None:
        return fr.agent.userfaultfd(pid)
    if _attaching:
        ag = _attaching[-1].agent
        if ag is None:
            ag = _attaching[-1].agent = Agent(pid, all_threads=False)
        else:
            ag.seize(pid, all_threads=False)
        try:
            return ag.userfaultfd(pid)
        finally:
            ag.release_one(pid)
    with Agent(pid, all_threads=False) as ag:
        return ag.userfaultfd()


class Attaching:
    """While open, the attaches of this process share one ptrace agent (a tree: one fork, not one per process)."""

    def __init__(self) -> None:
        self.agent: Agent | None = None

    def __enter__(self) -> Attaching:
        _attaching.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _attaching.remove(self)
        if self.agent is not None:
            self.agent.close()


_attaching: list[Attaching] = []
