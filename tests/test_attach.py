"""Attaching by syscall injection leaves the target exactly as it was."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from conftest import compile_target, require_kernel
from wpdump.tracking.tracker import Tracker


@pytest.fixture(scope="module")
def blocked_exe(build_dir):
    return compile_target("blocked", build_dir)


def start(exe, *args: str) -> subprocess.Popen:
    p = subprocess.Popen([str(exe), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().startswith("ready")
    return p


def wait_blocked(pid: int, tid: int | None = None) -> None:
    """Wait until the thread sleeps in the kernel (state S)."""
    tid = tid or pid
    for _ in range(200):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "S":
                return
        time.sleep(0.01)
    raise AssertionError("target never blocked")


def fds(pid: int) -> dict[str, str]:
    return {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}


def test_attach_to_thread_blocked_in_read(blocked_exe):
    require_kernel()
    p = start(blocked_exe, "read")
    try:
        wait_blocked(p.pid)
        before = fds(p.pid)
        with Tracker(p.pid) as tr:
            # the target keeps no userfaultfd of its own (docs/kernel.md rule 10) and no other fd changed
            assert fds(p.pid) == before
            assert os.readlink(f"/proc/self/fd/{tr.uffd_fd}") == "anon_inode:[userfaultfd]"
            p.stdin.write("hello")
            p.stdin.flush()
            out = p.stdout.readline().split()
        assert out == ["read", "5", "hello"]
        assert p.wait(5) == 0
    finally:
        p.kill()


def test_attach_to_thread_blocked_in_nanosleep(blocked_exe):
    require_kernel()
    p = start(blocked_exe, "sleep", "1500")
    try:
        wait_blocked(p.pid)
        t0 = time.monotonic()
        tr = Tracker(p.pid)
        tr.harvest()
        out = p.stdout.readline().split()
        tr.close()
        # nanosleep completes with 0 after the full time, not early and not with EINTR
        assert out[:2] == ["slept", "0"]
        assert 1490 <= float(out[2]) < 1500 + 1000 * (time.monotonic() - t0) + 500
        assert p.wait(5) == 0
    finally:
        p.kill()


def test_attach_while_threads_wait_on_futex(blocked_exe):
    require_kernel()
    p = start(blocked_exe, "futex")
    try:
        for _ in range(200):
            tids = sorted(int(t) for t in os.listdir(f"/proc/{p.pid}/task"))
            if len(tids) == 2:
                break
            time.sleep(0.01)
        assert len(tids) == 2
        for tid in tids:
            wait_blocked(p.pid, tid)
        with Tracker(p.pid) as tr:
            tr.harvest()
            p.stdin.write("go")
            p.stdin.flush()
            assert p.stdout.readline().split() == ["woke", "2", "go"]
        assert p.wait(5) == 0
    finally:
        p.kill()


def test_attach_to_busy_thread_keeps_it_running(target):
    """A thread in user space (writers spinning) is interrupted, used and resumed unharmed."""
    a = target.map(32)
    target.cmd("threads", 2, hex(a), 32)
    with Tracker(target.pid) as tr:
        before = int(target.cmd("writes")[0])
        time.sleep(0.05)
        h = tr.harvest()
        assert any(v.vma.start <= a < v.vma.end and len(v.copy) for v in h.vmas)
    assert int(target.cmd("stopthreads")[0]) > before
    assert target.alive()


def test_failed_attach_restores_the_target(blocked_exe):
    """userfaultfd() fails inside the target (no free fd): error raised, target continues exactly."""
    import resource

    from wpdump.errors import TrackerError

    require_kernel()
    p = start(blocked_exe, "read")
    try:
        wait_blocked(p.pid)
        nfds = len(fds(p.pid))
        resource.prlimit(p.pid, resource.RLIMIT_NOFILE, (nfds, nfds))
        with pytest.raises(TrackerError) as exc:
            Tracker(p.pid)
        assert exc.value.errno == 24 and exc.value.pid == p.pid  # EMFILE
        assert "userfaultfd" in str(exc.value)
        with open(f"/proc/{p.pid}/status") as f:
            assert "TracerPid:\t0\n" in f.read()
        p.stdin.write("after")
        p.stdin.flush()
        assert p.stdout.readline().split() == ["read", "5", "after"]
        assert p.wait(5) == 0
    finally:
        p.kill()


def test_attach_to_stopped_target_keeps_it_stopped(target):
    """A SIGSTOPped target is still stopped after the attach, and runs normally after SIGCONT."""
    import signal

    from conftest import copied_pages

    a = target.map(16)
    os.kill(target.pid, signal.SIGSTOP)
    wait_state(target.pid, "T")
    with Tracker(target.pid) as tr:
        time.sleep(0.05)
        assert state(target.pid) == "T"
        os.kill(target.pid, signal.SIGCONT)
        target.cmd("poke", hex(a), "1,2")
        h = tr.harvest()
        assert copied_pages(h, a, a + 16 * 4096) == {a + 4096, a + 2 * 4096}


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def wait_state(pid: int, want: str) -> None:
    for _ in range(200):
        if state(pid) == want:
            return
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} never reached state {want}")


def test_seizing_a_process_that_just_exited_is_thread_gone_not_permission_denied():
    """docs/kernel.md rule 34: ptrace(PTRACE_SEIZE) of a zombie fails with EPERM, not ESRCH; a process of a tree that
    exits as the freeze seizes it must read as gone (it failed a dump in a fork/exit storm as 'permission denied')."""
    from wpdump import _native
    from wpdump.target.process import read_stat
    from wpdump.target.ptrace import Thread, ThreadGone

    p = subprocess.Popen(["true"])
    try:
        deadline = time.time() + 10
        while read_stat(p.pid).state != "Z":  # exited, not reaped: a zombie
            assert time.time() < deadline
            time.sleep(0.005)
        assert _native.lib.wpd_ptrace_seize(p.pid, 0) == -1  # -EPERM: the kernel's answer the code must read
        with pytest.raises(ThreadGone):
            Thread(p.pid, p.pid).seize()
    finally:
        p.wait()
