"""The target's life around the tracker: fork, execve, exit, its own userfaultfd, io_uring fixed
buffers, permissions, pids that do not exist. Real target, real kernel."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import PAGE, copied_pages
from test_vma_events import Model, attach, iso_map, pages_of, rel, vma_pages, wait_idle
from wpdump.errors import NoSuchProcess, RangeBusy, TargetExeced, TargetExited
from wpdump.target import iouring
from wpdump.tracking.tracker import Tracker

SYS_PAUSE = 34  # x86_64
SYS_CLOCK_NANOSLEEP = 230


def wait_in_syscall(pid: int, nr: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/syscall") as f:
                if f.read().split()[0] == str(nr):
                    return
        except OSError:
            pass
        time.sleep(0.001)
    raise AssertionError(f"pid {pid} never blocked in syscall {nr}")


PR_SET_CHILD_SUBREAPER = 36


def reap_orphan(target, child: int) -> None:
    """Kill the target and reap its (killed) child: as a subreaper we inherit it instead of pid 1,
    which does not reap here."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        target.kill()
        assert os.waitpid(child, 0)[0] == child
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def test_fork_does_not_disturb_parent_tracking(target):
    a = iso_map(target, 32)
    end = a + 32 * PAGE
    target.cmd("fill", hex(a), 32, 21)
    with attach(target) as tr:
        m = Model(tr)
        m.harvest(tr)
        child = int(target.cmd("fork", hex(a), 8)[0])  # the child flips a byte in pages 0-7
        try:
            wait_in_syscall(child, SYS_PAUSE)
            # the child wrote its own copies: the parent's memory and image are unchanged
            for i in range(8):
                mine, theirs = target.read_mem(a + i * PAGE, PAGE), open_mem(child, a + i * PAGE)
                assert theirs[0] == mine[0] ^ 0x5A and theirs[1:] == mine[1:]
            h = m.harvest(tr)
            assert copied_pages(h, a, end) == set()  # fork wrote nothing in the parent's mapping
            m.check()
            # parent writes after the fork: to pages the child copied (0, 3; now exclusive again)
            # and to pages still shared copy-on-write with the child (20, 31)
            target.cmd("poke", hex(a), "0,3,20,31")
            h = m.harvest(tr)
            assert rel(a, copied_pages(h, a, end)) == [0, 3, 20, 31]
            m.check()
            target.cmd("poke", hex(a), "20")
            target.cmd("fill", hex(a + 10 * PAGE), 2, 22)
            h = m.harvest(tr)
            assert rel(a, copied_pages(h, a, end)) == [10, 11, 20]
            assert m.check() >= 32
            # the child was never tracked by us and still holds its own content
            assert open_mem(child, a)[0] != target.read_mem(a, 1)[0]
        finally:
            os.kill(child, signal.SIGKILL)
            reap_orphan(target, child)


def open_mem(pid: int, addr: int, length: int = PAGE) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        return os.pread(f.fileno(), length, addr)


def test_execve_raises_target_execed(target):
    a = target.map(16)
    target.cmd("fill", hex(a), 16, 23)
    sleep_exe = os.path.realpath("/bin/sleep")
    with attach(target) as tr:
        tr.harvest()
        target.cmd("exec")
        wait_in_syscall(target.pid, SYS_CLOCK_NANOSLEEP)
        assert os.readlink(f"/proc/{target.pid}/exe") == sleep_exe
        with pytest.raises(TargetExeced) as ei:
            tr.harvest()
        assert ei.value.pid == target.pid
        with pytest.raises(TargetExeced):  # it stays an error, never a silent empty round
            tr.harvest()
    assert target.alive()  # the tracker did not harm the new program


def harvest_until_gone(tr: Tracker, seconds: float = 10) -> tuple[int, BaseException]:
    """Harvest in a loop until it raises; bounded in time: it must not run on forever."""
    rounds = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            tr.harvest()
        except Exception as e:  # noqa: BLE001 - the test checks the type
            return rounds, e
        rounds += 1
    raise AssertionError(f"the target died but {rounds} harvests kept returning")


def test_target_exit_command_raises_target_exited(target):
    a = target.map(16)
    target.cmd("fill", hex(a), 16, 24)
    with attach(target) as tr:
        tr.harvest()
        target.cmd("exit")
        rounds, err = harvest_until_gone(tr)
        assert isinstance(err, TargetExited) and isinstance(err, NoSuchProcess), repr(err)
        assert err.pid == target.pid
        target.proc.wait(5)  # reaped: the pid is gone altogether now
        with pytest.raises(TargetExited):
            tr.harvest()


@pytest.mark.parametrize("delay", [0.01, 0.05, 0.15])
def test_target_killed_while_harvesting(target, delay):
    """SIGKILL lands at a random point of a harvest loop while four threads write."""
    a = target.map(256)
    target.cmd("fill", hex(a), 256, 25)
    with attach(target) as tr:
        target.cmd("threads", 4, hex(a), 256)
        tr.harvest()  # the loop is running when the killer starts, even on a loaded machine
        killer = subprocess.Popen(["sh", "-c", f"sleep {delay}; kill -9 {target.pid}"])
        try:
            _, err = harvest_until_gone(tr)
        finally:
            killer.wait(10)
        assert isinstance(err, TargetExited), repr(err)
        assert target.proc.wait(5) == -signal.SIGKILL


def test_target_with_own_userfaultfd(target):
    a = iso_map(target, 32)
    end = a + 32 * PAGE
    lo, hi = a + 8 * PAGE, a + 16 * PAGE
    target.cmd("fill", hex(a), 32, 26)  # every page present: the target's MISSING mode never fires
    target.cmd("uffd", hex(lo), 8)
    wait_idle(target.pid)
    with Tracker(target.pid, allow_userfaultfd_target=True) as tr:
        busy = tr.busy_ranges
        assert [(type(b), b.start, b.end, b.pid) for b in busy] == [(RangeBusy, lo, hi, target.pid)]
        m = Model(tr)
        vp = vma_pages(tr.initial, lo)
        assert vp.whole and rel(lo, {p for s, e in vp.copy for p in range(int(s), int(e), PAGE)}) == list(range(8))
        for _ in range(2):
            target.cmd("poke", hex(a), "2,12,20")
            h = m.harvest(tr)
            probs = [p for p in h.problems if isinstance(p, RangeBusy)]
            assert [(p.start, p.end) for p in probs] == [(lo, hi)]
            # outside the busy range writes are tracked exactly; the busy range is dumped whole
            assert rel(a, copied_pages(h, a, lo) | copied_pages(h, hi, end)) == [2, 20]
            assert copied_pages(h, lo, hi) == pages_of(lo, range(8))
            assert vma_pages(h, lo).whole
            m.check()
            m.check([(lo, hi)])
        assert [(b.start, b.end) for b in tr.busy_ranges] == [(lo, hi)]
    # the target's own registration is untouched by the tracker
    assert "um" in target.smaps_flags(lo) and target.cmd("read", hex(lo), 8)


def test_io_uring_fixed_buffer_copied_every_round(target):
    a = iso_map(target, 16)
    end = a + 16 * PAGE
    buf = a + 4 * PAGE
    target.cmd("fill", hex(a), 16, 27)
    with attach(target) as tr:
        m = Model(tr)
        m.harvest(tr)
        target.cmd("iouring", hex(buf), 4)
        assert iouring.registered_buffers(target.pid) == [(buf, buf + 4 * PAGE)]
        for _ in range(3):
            h = m.harvest(tr)
            assert pages_of(buf, range(4)) <= copied_pages(h, a, end)
            m.check()
        # no writes: the pinned buffer is all that is reported in the mapping
        assert copied_pages(h, a, end) == pages_of(buf, range(4))
        target.cmd("poke", hex(a), "0,15")
        h = m.harvest(tr)
        assert rel(a, copied_pages(h, a, end)) == [0, 4, 5, 6, 7, 15]
        m.check()


# The venv's interpreter lives under /root (mode 700) here, so user nobody cannot start it: the child
# starts as root, imports everything, drops to nobody for good, then attaches.
ATTACH_AS_NOBODY = """
import os, sys
from wpdump.tracking.tracker import Tracker
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
assert os.getuid() == os.geteuid() == 65534 and os.getgid() == 65534
try:
    Tracker(int(sys.argv[1])).close()
except Exception as e:
    print(type(e).__name__, e, flush=True)
else:
    print("attached", flush=True)
"""


def test_non_root_attach_to_root_is_access_denied(target):
    a = target.map(8)
    target.cmd("fill", hex(a), 8, 28)
    before = target.read_mem(a, 8 * PAGE)
    sum_before = target.cmd("read", hex(a), 8)
    r = subprocess.run(
        [sys.executable, "-c", ATTACH_AS_NOBODY, str(target.pid)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert r.stdout.split()[:1] == ["AccessDenied"], (r.stdout, r.stderr)
    assert str(target.pid) in r.stdout
    # the target runs on unharmed: not traced, not protected, same memory, still answers
    wait_idle(target.pid)
    with open(f"/proc/{target.pid}/status") as f:
        assert "TracerPid:\t0\n" in f.read()
    assert "uw" not in target.smaps_flags(a)
    assert target.read_mem(a, 8 * PAGE) == before
    assert target.cmd("read", hex(a), 8) == sum_before
    target.cmd("poke", hex(a), "1")
    assert target.read_mem(a, 8 * PAGE) != before and target.alive()


def test_nonexistent_pid_is_no_such_process():
    p = subprocess.Popen(["true"])
    p.wait()
    with pytest.raises(NoSuchProcess) as ei:
        Tracker(p.pid)
    assert ei.value.pid == p.pid


def test_zombie_pid_is_target_exited():
    p = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open(f"/proc/{p.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.001)
        with pytest.raises(TargetExited):
            Tracker(p.pid)
    finally:
        p.wait()
