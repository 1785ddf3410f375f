"""Tracking is invisible to the target, and killing wpdump at any moment leaves it running normally (issue 10)."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from chaincheck import compare_with_memory
from conftest import compile_target, default_sigint, require_kernel, unavailable
from wpdump.dump import iteration

PAGE = 4096


def wpdump(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wpdump.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def one_line_error(p: subprocess.CompletedProcess, *words: str) -> str:
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wpdump: ") and "Traceback" not in p.stderr, p.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# glibc registers rseq: a thread resumed on another CPU finds its cpu_id rewritten by the kernel, a page that
# then differs from the image. Targets compared while running do without.
NO_RSEQ = {**os.environ, "GLIBC_TUNABLES": "glibc.pthread.rseq=0"}


def start(exe, *args: object) -> subprocess.Popen:
    p = subprocess.Popen([str(exe), *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         bufsize=1, env=NO_RSEQ)
    first = p.stdout.readline().split()
    assert first[:1] == ["ready"], first
    return p


def syscall_of(pid: int, tid: int | None = None) -> int | None:
    """The syscall the thread is blocked in, or None when it runs."""
    with open(f"/proc/{pid}/task/{tid or pid}/syscall") as f:
        first = f.read().split()[0]
    return int(first) if first.isdigit() else None


def wait_in(pid: int, nrs: set[int], tid: int | None = None) -> None:
    """Wait until the thread sleeps in one of the syscalls ``nrs`` (S, or D: a vfork parent)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = open(f"/proc/{pid}/task/{tid or pid}/stat").read().rsplit(")", 1)[1].split()[0]
        if st in "SD" and syscall_of(pid, tid) in nrs:
            return
        time.sleep(0.001)
    raise AssertionError(f"pid {pid} never blocked in {nrs}")


def ask(p: subprocess.Popen, cmd: str) -> str:
    p.stdin.write(cmd)
    p.stdin.flush()
    return p.stdout.readline().strip()


def fds(pid: int) -> dict[str, str]:
    return {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def tracer(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(ln for ln in f if ln.startswith("TracerPid:")).split()[1])


def wait_untraced(pid: int) -> None:
    """Wait until no ptrace agent holds the target any more (it finishes after the command is gone)."""
    deadline = time.monotonic() + 30
    while tracer(pid) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert tracer(pid) == 0


# --------------------------------------------------------------------------------------------- 10.1 seccomp


@pytest.mark.parametrize("mode", ["kill", "killproc", "trap", "errno", "strict"])
def test_seccomp_target_is_tracked_unharmed(build_dir, tmp_path, mode):
    """A filter answering userfaultfd() with KILL, TRAP or ERRNO, or strict mode: the injection runs with seccomp
    suspended; the target neither dies, nor traps, nor loses its fd 323."""
    require_kernel()
    p = start(compile_target("seccomp", build_dir), mode)
    try:
        wait_in(p.pid, {0})
        before = fds(p.pid)
        r = wpdump("pre-dump", "-t", p.pid, "-D", tmp_path / "1")
        assert r.returncode == 0, r.stderr
        compare_with_memory(str(tmp_path / "1"), p.pid)
        assert ask(p, "w") == "ok"
        wait_in(p.pid, {0})
        r = wpdump("pre-dump", "-t", p.pid, "-D", tmp_path / "2", "--prev-images-dir", "../1")
        assert r.returncode == 0, r.stderr
        compare_with_memory(str(tmp_path / "2"), p.pid)
        assert fds(p.pid) == before
        if mode != "strict":
            assert ask(p, "s") == "sigsys 0 fd323 OK"
        assert ask(p, "w") == "ok"
    finally:
        iteration.untrack(p.pid)
        p.kill()
        p.wait()


@pytest.mark.parametrize("mode", ["killproc", "trap"])
def test_seccomp_refused_by_name_without_cap_sys_admin(build_dir, tmp_path, mode):
    """Without CAP_SYS_ADMIN seccomp cannot be suspended: wpdump refuses, naming seccomp, and injects nothing."""
    require_kernel()
    p = start(compile_target("seccomp", build_dir), mode)
    try:
        wait_in(p.pid, {0})
        before = fds(p.pid)
        r = subprocess.run(["setpriv", "--bounding-set", "-sys_admin", sys.executable, "-m", "wpdump.cli", "pre-dump",
                            "-t", str(p.pid), "-D", str(tmp_path / "1")], capture_output=True, text=True, timeout=120)
        one_line_error(r, "seccomp", "CAP_SYS_ADMIN")
        assert fds(p.pid) == before and tracer(p.pid) == 0
        assert ask(p, "s") == "sigsys 0 fd323 OK"
    finally:
        p.kill()
        p.wait()


# ---------------------------------------------------------------------------------- 10.2 signals during attach


class Flood:
    """tests/targets/sigflood.c (its ``args``) and two senders queueing ``n`` real-time signals each. Target and
    senders run as nobody: the pending-signal limit is per user, and root's other processes must not find it
    exhausted."""

    def __init__(self, build_dir, n: int, *args: str) -> None:
        self.n = n
        self.dir = tempfile.mkdtemp(prefix="wpdump-flood-")
        os.chmod(self.dir, 0o755)
        self.exe = shutil.copy(compile_target("sigflood", build_dir), os.path.join(self.dir, "sigflood"))
        os.chmod(self.exe, 0o755)
        self.p = subprocess.Popen([self.exe, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  bufsize=1, user=65534)
        self.senders: list[subprocess.Popen] = []

    def __enter__(self) -> Flood:
        if self.p.stdout.readline().split()[:1] != ["ready"]:
            self.__exit__()
            pytest.fail("sigflood did not start")
        return self

    def send(self) -> None:
        self.senders = [subprocess.Popen([self.exe, "send", str(self.p.pid), str(k), str(self.n)],
                                         stdout=subprocess.PIPE, text=True, user=65534) for k in (0, 1)]

    def sending(self) -> bool:
        return any(s.poll() is None for s in self.senders)

    def assert_all_delivered(self) -> None:
        """Every signal sent, and delivered once and in order."""
        for s in self.senders:
            assert s.communicate(timeout=300)[0].split() == ["sent", str(self.n)]
        deadline = time.monotonic() + 60
        want = f"count {self.n} {self.n} disorder 0"
        while (reply := ask(self.p, "c")) != want and time.monotonic() < deadline:
            time.sleep(0.01)
        assert reply == want

    def __exit__(self, *exc: object) -> None:
        for s in [*self.senders, self.p]:
            s.kill()
            s.wait()
        shutil.rmtree(self.dir)


def test_signal_flood_during_attaches_loses_nothing(build_dir, tmp_path):
    """Two senders queue 2 x 50,000 real-time signals while wpdump attaches 20 times: every attach succeeds, every
    signal is delivered once, in order, and the target keeps no userfaultfd."""
    require_kernel()
    from wpdump.tracking.tracker import Tracker

    with Flood(build_dir, 50_000) as f:
        before = fds(f.p.pid)
        f.send()
        for _ in range(20):
            with Tracker(f.p.pid) as tr:
                tr.harvest()
        f.assert_all_delivered()
        assert fds(f.p.pid) == before


def test_signal_flood_during_paused_harvests_loses_nothing(build_dir, tmp_path, monkeypatch):
    """A thread of the target never sleeps, so every harvest pauses it (freeze.Pause: seize, interrupt, detach)
    while two senders queue 2 x 20,000 real-time signals: every signal is delivered once, in order, its parent sees
    no stop or continue, and no thread is left traced or stopped."""
    require_kernel()
    from wpdump.tracking import tracker
    from wpdump.tracking.tracker import Tracker

    monkeypatch.setattr(tracker, "_SLOWER", 0.0)  # pause whenever a thread runs, however fast the scan
    with Flood(build_dir, 20_000, "spin") as f:
        pid = f.p.pid
        f.send()
        rounds = stalls = 0
        with Tracker(pid) as tr:
            while rounds < 20 or (f.sending() and rounds < 5000):
                stalls += len(tr.harvest().stalls)
                rounds += 1
        assert stalls >= rounds - 1  # every harvest but the attach paused the spinning thread
        f.assert_all_delivered()
        assert os.waitid(os.P_PID, pid, os.WSTOPPED | os.WCONTINUED | os.WNOHANG | os.WNOWAIT) is None
        for tid in os.listdir(f"/proc/{pid}/task"):
            assert tracer(int(tid)) == 0
        spinner = max(int(t) for t in os.listdir(f"/proc/{pid}/task"))
        with open(f"/proc/{pid}/task/{spinner}/stat") as st:
            assert st.read().rsplit(")", 1)[1].split()[0] == "R"


# ------------------------------------------------------------------------------------- 10.3 killing wpdump


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_killing_wpdump_during_attach_leaves_the_target_running(target, tmp_path, sig):
    """The command is killed the moment the target is traced (mid-attach): the target runs on, unprotected, with
    no userfaultfd of its own, its registers and memory intact."""
    a = target.map(64)
    target.cmd("fill", hex(a), 64, 3)
    target.wait_idle()
    before = fds(target.pid)
    for _ in range(10):
        p = subprocess.Popen([sys.executable, "-m", "wpdump.cli", "pre-dump", "-t", str(target.pid), "-D",
                              str(tmp_path / "1")], stderr=subprocess.DEVNULL, preexec_fn=default_sigint)
        while not tracer(target.pid) and p.poll() is None:
            pass  # spin: the attach lasts well under a millisecond
        p.send_signal(sig)
        p.wait()
        wait_untraced(target.pid)
        iteration.untrack(target.pid)
        assert target.alive() and fds(target.pid) == before
        assert target.cmd("hash", hex(a), 64) == target.cmd("hash", hex(a), 64)
        target.cmd("poke", hex(a), "0,1,2")
        target.wait_idle()
        subprocess.run(["rm", "-rf", str(tmp_path / "1")], check=True)


def test_killed_harvest_during_its_pause_leaves_the_target_running(build_dir, tmp_path):
    """SIGKILL of a process whose harvest holds the target's running thread paused (freeze.Pause traces it from
    the harvesting process itself): the kernel detaches it and it runs on."""
    require_kernel()
    p = subprocess.Popen([str(compile_target("sigflood", build_dir)), "spin"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, bufsize=1)
    assert p.stdout.readline().split()[:1] == ["ready"]
    try:
        while len(os.listdir(f"/proc/{p.pid}/task")) < 2:
            time.sleep(0.001)
        spinner = max(int(t) for t in os.listdir(f"/proc/{p.pid}/task"))
        loop = (f"from wpdump.tracking import tracker\ntracker._SLOWER = 0.0\ntr = tracker.Tracker({p.pid})\n"
                "while True:\n    tr.harvest()\n")
        for _ in range(3):
            h = subprocess.Popen([sys.executable, "-c", loop], stderr=subprocess.DEVNULL)
            while not tracer(spinner) and h.poll() is None:
                pass  # spin until a pause holds it
            assert h.poll() is None
            h.kill()
            h.wait()
            wait_untraced(spinner)
            deadline = time.monotonic() + 30
            while state(spinner) != "R" and time.monotonic() < deadline:
                time.sleep(0.001)
            assert state(spinner) == "R" and state(p.pid) == "S"
        assert os.waitid(os.P_PID, p.pid, os.WSTOPPED | os.WCONTINUED | os.WNOHANG | os.WNOWAIT) is None
        assert ask(p, "c").startswith("count 0 0")
    finally:
        p.kill()
        p.wait()


# ------------------------------------------------------------------------------------- 10.4 a killed freeze


def test_killed_dump_leaves_the_target_running(target, tmp_path):
    """SIGKILL of `wpdump dump` while the target is frozen: the kernel resumes it (a ptrace freeze)."""
    a = target.map(256 * 256)
    target.cmd("fill", hex(a), 256 * 256, 5)  # 256 MiB: the frozen copy takes a while
    target.wait_idle()
    for _ in range(3):
        p = subprocess.Popen([sys.executable, "-m", "wpdump.cli", "dump", "-t", str(target.pid), "-D",
                              str(tmp_path / "d")], stderr=subprocess.DEVNULL)
        while state(target.pid) not in ("t", "T") and p.poll() is None:
            time.sleep(0.0005)
        p.kill()
        p.wait()
        wait_untraced(target.pid)
        deadline = time.monotonic() + 30
        while state(target.pid) in ("t", "T") and time.monotonic() < deadline:
            time.sleep(0.001)
        assert state(target.pid) not in ("t", "T")
        target.cmd("poke", hex(a), "0,1")  # it runs
        target.wait_idle()
        subprocess.run(["rm", "-rf", str(tmp_path / "d")], check=True)
        iteration.untrack(target.pid)


def test_killed_verify_leaves_the_target_running(target, tmp_path):
    """SIGKILL of `wpdump verify -t` while it holds the target frozen: the target runs on."""
    a = target.map(256 * 256)
    target.cmd("fill", hex(a), 256 * 256, 7)
    target.wait_idle()
    r = wpdump("pre-dump", "-t", target.pid, "-D", tmp_path / "1")
    assert r.returncode == 0, r.stderr
    p = subprocess.Popen([sys.executable, "-m", "wpdump.cli", "verify", "-t", str(target.pid), "-D",
                          str(tmp_path / "1")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while state(target.pid) not in ("t", "T") and p.poll() is None:
        time.sleep(0.0005)
    p.kill()
    p.wait()
    wait_untraced(target.pid)
    assert state(target.pid) not in ("t", "T")
    target.cmd("poke", hex(a), "0,1")
    iteration.untrack(target.pid)


def test_ctrl_c_during_the_agents_fork_is_not_lost(target):
    """A SIGINT that arrives while the command forks its ptrace agent interrupts the command (before: raised in
    logging's at-fork handler, it was printed as "Exception ignored" and lost, and the attach went on)."""
    code = f"""
import os, signal
from wpdump.target.agent import Agent
signal.signal(signal.SIGINT, signal.default_int_handler)  # a script's background job starts with it ignored
os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), signal.SIGINT))
try:
    Agent({target.pid}, all_threads=False).close()
except KeyboardInterrupt:
    print("interrupted")
else:
    print("lost")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "interrupted" and "Exception ignored" not in r.stderr, r.stdout + r.stderr
    wait_untraced(target.pid)
    target.cmd("poke", hex(target.map(1)), "0,1")  # it runs and answers


def test_dump_is_not_seen_by_the_parent(target, tmp_path):
    """The freeze is no group stop: the target's parent (this test) gets no CLD_STOPPED or CLD_CONTINUED."""
    a = target.map(16)
    target.cmd("fill", hex(a), 16, 1)
    target.wait_idle()
    r = wpdump("dump", "-t", target.pid, "-D", tmp_path / "d")
    assert r.returncode == 0, r.stderr
    assert os.waitid(os.P_PID, target.pid, os.WSTOPPED | os.WCONTINUED | os.WNOHANG | os.WNOWAIT) is None
    target.cmd("poke", hex(a), "0")


def test_dump_keeps_a_stopped_target_stopped_and_leave_stopped_stops(target, tmp_path):
    a = target.map(16)
    target.cmd("fill", hex(a), 16, 1)
    target.wait_idle()
    r = wpdump("dump", "-t", target.pid, "-D", tmp_path / "d1", "--leave-stopped")
    assert r.returncode == 0, r.stderr
    assert state(target.pid) == "T"
    r = wpdump("dump", "-t", target.pid, "-D", tmp_path / "d2")
    assert r.returncode == 0, r.stderr
    assert state(target.pid) == "T"
    compare_with_memory(str(tmp_path / "d2"), target.pid)
    os.kill(target.pid, signal.SIGCONT)
    target.cmd("poke", hex(a), "0")


# ------------------------------------------------------------------------------------------ 10.7 odd targets


def test_pid_namespace_init_is_dumped(build_dir, tmp_path):
    """Inside its pid namespace, init ignores SIGSTOP (SIGSTOP dumps waited 5 s and failed): wpdump run in the
    namespace freezes it with ptrace all the same."""
    require_kernel()
    exe = str(compile_target("blockers", build_dir))
    u = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", exe, "read"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=NO_RSEQ)
    try:
        assert u.stdout.readline().split() == ["ready", "1"]
        with open(f"/proc/{u.pid}/task/{u.pid}/children") as f:
            pid = int(f.read().split()[0])
        wait_in(pid, {0})
        r = subprocess.run(["nsenter", "-t", str(pid), "--pid", "--mount", sys.executable, "-m", "wpdump.cli", "dump",
                            "-t", "1", "-D", str(tmp_path / "d")], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        for name in os.listdir(tmp_path / "d"):  # images name the pid as the namespace sees it
            if name.endswith("-1.img"):
                shutil.copy(tmp_path / "d" / name, tmp_path / "d" / name.replace("-1.img", f"-{pid}.img"))
        compare_with_memory(str(tmp_path / "d"), pid)
        assert tracer(pid) == 0 and state(pid) == "S"
        u.stdin.write("x\n")
        u.stdin.flush()
        assert u.stdout.readline().split() == ["read", "1", "0"]
    finally:
        u.kill()
        u.wait()


def test_kernel_thread_is_named(tmp_path):
    one_line_error(wpdump("pre-dump", "-t", 2, "-D", tmp_path / "k"), "kernel thread")


def test_vfork_parent_is_refused_quickly(build_dir, tmp_path):
    """A main thread waiting in vfork() cannot be stopped until its child execs or exits: a clear error, not a
    hang; the target goes on when the child exits."""
    require_kernel()
    p = start(compile_target("blockers", build_dir), "vfork")
    try:
        wait_in(p.pid, {58})
        one_line_error(wpdump("pre-dump", "-t", p.pid, "-D", tmp_path / "v"), "vfork")
        assert tracer(p.pid) == 0
        assert ask(p, "x\n").split() == ["vfork", "0", "0"]
    finally:
        p.kill()
        p.wait()


def test_32bit_target_is_named(build_dir, tmp_path):
    require_kernel()
    exe = build_dir / "seccomp32"
    r = subprocess.run(["gcc", "-m32", "-O1", "-o", str(exe), os.path.join(os.path.dirname(__file__), "targets",
                        "seccomp.c")], capture_output=True, text=True)
    if r.returncode != 0:
        unavailable(f"gcc -m32 failed (tools/setup installs gcc-multilib): {r.stderr}")
    p = start(exe, "none")
    try:
        one_line_error(wpdump("pre-dump", "-t", p.pid, "-D", tmp_path / "v"), "32-bit processes are not supported")
        assert ask(p, "w") == "ok"
    finally:
        p.kill()
        p.wait()


# ------------------------------------------------------------------------------- 10.5 interrupted syscalls

# x86_64 numbers of the calls the blockers target sleeps in (restart_syscall = 219 after a restart)
BLOCKERS = {
    "read": ({0}, "x\n", "read 1 0"),
    "poll": ({7}, "x\n", "poll 1 0"),
    "ppoll": ({271}, "x\n", "ppoll 1 0"),
    "ppollmask": ({271}, "x\n", "ppollmask 1 0 mask 1"),
    "select": ({23, 270}, "x\n", "select 1 0"),
    "futex": ({202}, "x\n", "futex 0 0"),
    "waitpid": ({61}, "x\n", "waitpid 7 0"),
    "sigsuspend": ({130}, signal.SIGUSR1, "sigsuspend -1 4 mask 1"),
    "pause": ({34, 130}, signal.SIGUSR1, "pause -1 4"),
    "sigtimedwait": ({128}, signal.SIGUSR2, "sigtimedwait 12 0"),
    "epoll": ({232, 281}, "x\n", "epoll 1 0"),
    "nanosleep": ({35, 230}, None, "nanosleep 0 0"),
}


@pytest.mark.parametrize("call", list(BLOCKERS))
def test_blocked_syscall_completes_normally_after_attach_and_dump(build_dir, tmp_path, call):
    """A thread sleeping in a syscall is interrupted by the attach and the freeze: the syscall is restarted and
    completes as it would have (no EINTR, no stray errno, its signal mask kept)."""
    require_kernel()
    nrs, wake, want = BLOCKERS[call]
    p = start(compile_target("blockers", build_dir), call)
    try:
        wait_in(p.pid, nrs)
        for i, kind in enumerate(("pre-dump", "dump")):
            args = ["--prev-images-dir", "../0"] if i else []
            r = wpdump(kind, "-t", p.pid, "-D", tmp_path / str(i), *args)
            assert r.returncode == 0, r.stderr
            wait_untraced(p.pid)
            if call != "nanosleep":  # (it may end meanwhile on a slow machine)
                assert not select.select([p.stdout], [], [], 0)[0], p.stdout.readline()  # still blocked
                assert syscall_of(p.pid) in nrs | {219}
        if isinstance(wake, str):
            p.stdin.write(wake)
            p.stdin.flush()
        elif wake is not None:
            os.kill(p.pid, wake)
        assert p.stdout.readline().strip() == want
    finally:
        iteration.untrack(p.pid)
        p.kill()
        p.wait()


def test_process_whose_main_thread_exited_is_named(build_dir, tmp_path):
    """zdtm's pthread02: main() calls pthread_exit while a thread runs on. Not "target exited": the process is
    alive, and the message says why it is not supported."""
    exe = compile_target("mainexit", build_dir)
    p = subprocess.Popen([str(exe)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        r = wpdump("pre-dump", "-t", p.pid, "-D", tmp_path / "1")
        assert r.returncode == 1 and "main thread exited" in r.stderr and "not supported" in r.stderr, r.stderr
        assert p.poll() is None and not (tmp_path / "1").exists()
    finally:
        p.kill()
        p.wait()
