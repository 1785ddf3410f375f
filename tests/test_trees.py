"""Process trees: -t PID is PID and all its descendants (prefork servers, pid namespaces, fork storms)."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from chaincheck import compare_with_memory, load_pagemap
from conftest import compile_target, require_kernel
from test_criu import CRIU, HOOK, criu, decode_all
from wpdump.dump import checkpoint, iteration
from wpdump.target.process import read_stat
from wpdump.target.tree import nspids, read_tree
from wpdump.tracking import keeper

PE_PARENT, PE_PRESENT = 1, 4
BURST = 32  # pages a prefork process writes on SIGRTMIN
BIN = pathlib.Path(sys.executable).parent


class Prefork:
    """tests/targets/prefork.c: a master and its workers, driven by signals, reporting to a file."""

    def __init__(self, exe: pathlib.Path, tmp: pathlib.Path, workers: int = 4, private: int = 256, shared: int = 64,
                 per_tick: int = 2, pidns: bool = False) -> None:
        self.result = tmp / "result"
        args = [str(exe), str(self.result), str(workers), str(private), str(shared), str(per_tick)]
        if pidns:  # a pid namespace's init must lead its own session, or CRIU refuses it
            args = ["unshare", "--pid", "--fork", "setsid", *args]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        self.root = self.proc.pid
        if pidns:
            self.root = self._child_of(self.proc.pid)
        self.wait_for("ready", workers + 1)

    @staticmethod
    def _child_of(pid: int) -> int:
        deadline = time.time() + 10
        while time.time() < deadline:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                kids = f.read().split()
            if kids:
                return int(kids[0])
            time.sleep(0.01)
        raise AssertionError(f"pid {pid} forked no child")

    def lines(self) -> list[list[str]]:
        return [ln.split() for ln in self.result.read_text().splitlines()] if self.result.exists() else []

    def wait_for(self, what: str, n: int, after: int = 0, timeout: float = 20) -> list[list[str]]:
        """The first ``n`` lines "PID WHAT ..." after line ``after`` (from distinct processes); a FAIL line fails."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            new = self.lines()[after:]
            fails = [ln for ln in new if len(ln) > 1 and ln[1] == "FAIL"]
            assert not fails, fails
            got = {ln[0]: ln for ln in new if len(ln) > 1 and ln[1] == what}
            if len(got) >= n:
                return list(got.values())
            time.sleep(0.01)
        raise AssertionError(f"{n} x {what!r} not seen: {self.lines()[after:]}")

    def pids(self) -> list[int]:
        return [m.pid for m in read_tree(self.root)]

    def signal_all(self, sig: int, what: str) -> list[list[str]]:
        """Send ``sig`` to every process of the tree and wait for each one's ``what`` line."""
        n = len(self.lines())
        pids = self.pids()
        for p in pids:
            os.kill(p, sig)
        return self.wait_for(what, len(pids), after=n)

    def kill(self) -> None:
        for p in ([self.root] if self.root != self.proc.pid else []) + [self.proc.pid]:
            try:
                os.killpg(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def prefork_exe(build_dir):
    return compile_target("prefork", build_dir)


@pytest.fixture
def prefork(prefork_exe, tmp_path):
    require_kernel()
    made: list[Prefork] = []

    def start(**kw) -> Prefork:
        made.append(Prefork(prefork_exe, tmp_path, **kw))
        return made[-1]

    yield start
    for t in made:
        t.kill()


def present(d: pathlib.Path, vpid: int, flag: int = PE_PRESENT) -> int:
    return sum(e["nr_pages"] for e in load_pagemap(str(d), vpid)[1] if e["flags"] & flag)


def vpids_in(d: pathlib.Path) -> set[int]:
    names = (n.name[len("pagemap-"):-len(".img")] for n in d.glob("pagemap-*.img"))
    return {int(n) for n in names if n.isdigit()}


def shared_objects(d: pathlib.Path) -> dict[int, int]:
    """shmid -> pages of each shared object image (pagemap-shmem-SHMID.img) in ``d``."""
    out = {}
    for f in d.glob("pagemap-shmem-*.img"):
        shmid = int(f.name[len("pagemap-shmem-"):-len(".img")])
        out[shmid] = sum(e["nr_pages"] for e in load_pagemap(str(d), f"shmem-{shmid}")[1])
    return out


def stop_all(pids: list[int]) -> None:
    for p in pids:
        os.kill(p, signal.SIGSTOP)
    deadline = time.time() + 10
    while not all(read_stat(p).state == "T" for p in pids):
        assert time.time() < deadline, "not stopped"
        time.sleep(0.005)


def cont_all(pids: list[int]) -> None:
    for p in pids:
        os.kill(p, signal.SIGCONT)


def test_prefork_server_pre_dumps_and_dump_equal_every_process(prefork, tmp_path):
    """A master and 4 workers writing their own memory and a shared anonymous region: pre-dump x3 (a worker exits
    and a new one is forked between the second and third), the final dump with the tree left stopped; every page
    of every process equals its memory (independent reader); each later pre-dump holds about what was written."""
    t = prefork(workers=4, private=256, shared=64)
    t.signal_all(signal.SIGUSR2, "paused")
    pids = t.pids()
    assert len(pids) == 5 and pids[0] == t.root
    d = tmp_path / "ckpt"
    d.mkdir()
    r1 = iteration.pre_dump(t.root, str(d / "1"))
    assert r1.processes == 5 and vpids_in(d / "1") == set(pids)
    with open(d / "1" / "wpdump.json") as f:
        meta = json.load(f)
    assert meta["vpid"] == t.root and {int(v): p["pid"] for v, p in meta["processes"].items()} == {p: p for p in pids}
    assert [s["members"] for s in iteration.status()] == [[[p, read_stat(p).start_ticks] for p in pids]]

    t.signal_all(signal.SIGRTMIN, "burst")
    r2 = iteration.pre_dump(t.root, str(d / "2"), "../1")
    assert r2.incremental and r2.processes == 5
    for p in pids:  # its burst and a few pages of stack and checksums
        assert BURST <= present(d / "2", p) <= BURST + 16, (p, present(d / "2", p))
    # the shared region, mapped by all 5, is stored once (whole: 4 slots of 4 pages the workers wrote)
    assert list(shared_objects(d / "2").values()) == [16]
    assert r2.pages_written < r1.pages_written // 4

    gone_pid = pids[2]
    n = len(t.lines())
    os.kill(gone_pid, signal.SIGTERM)
    t.wait_for("reaped", 1, after=n)
    n = len(t.lines())
    os.kill(t.root, signal.SIGHUP)
    spawned = int(t.wait_for("spawned", 1, after=n)[0][2])
    t.wait_for("ready", 1, after=n)
    t.signal_all(signal.SIGRTMIN, "burst")
    r3 = iteration.pre_dump(t.root, str(d / "3"), "../2")
    now = t.pids()
    assert r3.processes == 5 and vpids_in(d / "3") == set(now) and spawned in now and gone_pid not in now
    assert present(d / "3", spawned, PE_PARENT) == 0 and present(d / "3", spawned) > 256  # new: in full
    for p in now:
        if p != spawned:
            assert BURST <= present(d / "3", p) <= BURST + 16, (p, present(d / "3", p))
            assert present(d / "3", p, PE_PARENT) > 200

    t.signal_all(signal.SIGUSR2, "running")  # every process writes again until the freeze
    r4 = iteration.dump(t.root, str(d / "4"), "../3", leave_stopped=True)
    assert r4.processes == 5 and keeper.tracked_pids() == []
    try:
        assert all(read_stat(p).state == "T" for p in now)
        for p in now:
            assert compare_with_memory(str(d / "4"), p) > 0
        v = subprocess.run([str(BIN / "wpdump"), "verify", "-t", str(t.root), "-D", str(d)], capture_output=True,
                           text=True, timeout=120)
        assert v.returncode == 0 and v.stdout.count(" equals ") == 5, v.stdout + v.stderr
        s = subprocess.run([str(BIN / "wpdump"), "show", "-D", str(d)], capture_output=True, text=True, timeout=60)
        assert s.returncode == 0 and all(ln.split()[4] == "5" for ln in s.stdout.splitlines()[1:]), s.stdout
        # the shared object is checked through every mapping: one byte changed in its image, 5 processes differ
        (shmid, _), = shared_objects(d / "4").items()
        pages_id = load_pagemap(str(d / "4"), f"shmem-{shmid}")[0]
        with open(d / "4" / f"pages-{pages_id}.img", "r+b") as f:
            b = f.read(1)
            f.seek(0)
            f.write(bytes([b[0] ^ 0xFF]))
        v = subprocess.run([str(BIN / "wpdump"), "verify", "-t", str(t.root), "-D", str(d)], capture_output=True,
                           text=True, timeout=120)
        assert v.returncode == 1 and v.stdout.count("1 mismatching") == 5, v.stdout + v.stderr
    finally:
        cont_all(now)
    oks = t.signal_all(signal.SIGUSR1, "ok")  # the tree was not harmed: every process passes its self-check
    assert len(oks) == 5


def test_restore_memory_rolls_back_the_tree_or_refuses_untouched(prefork, tmp_path):
    t = prefork(workers=2, private=64, shared=32)
    t.signal_all(signal.SIGUSR2, "paused")
    pids = t.pids()
    iteration.pre_dump(t.root, str(tmp_path / "1"))
    t.signal_all(signal.SIGRTMIN, "burst")  # every process now differs from the checkpoint
    stop_all(pids)  # stopped, they stay stopped: compared with the checkpoint as restore-memory left them
    try:
        wp = subprocess.run([str(BIN / "wpdump"), "restore-memory", "-t", str(t.root), "-D", str(tmp_path / "1")],
                            capture_output=True, text=True, timeout=120)
        assert wp.returncode == 0 and "(3 processes)" in wp.stdout, wp.stdout + wp.stderr
        for p in pids:
            compare_with_memory(str(tmp_path / "1"), p)
    finally:
        cont_all(pids)
    assert len(t.signal_all(signal.SIGUSR1, "ok")) == 3  # checksums and pages rolled back together
    n = len(t.lines())
    os.kill(t.root, signal.SIGHUP)  # one more process: the tree is no longer the checkpoint's
    t.wait_for("ready", 1, after=n)
    wp = subprocess.run([str(BIN / "wpdump"), "restore-memory", "-t", str(t.root), "-D", str(tmp_path / "1")],
                        capture_output=True, text=True, timeout=120)
    assert wp.returncode == 1 and "processes changed" in wp.stderr, wp.stderr
    assert all(read_stat(p).state != "T" for p in t.pids())


def test_a_vpid_of_another_process_never_refers_to_its_pages(prefork, tmp_path):
    """Pid reuse inside the tree: when the parent's image of a vpid is of another process (another start time, as
    after that process exited and a new one got its pid), the new process is written in full, never PE_PARENT."""
    t = prefork(workers=2, private=64, shared=0)
    t.signal_all(signal.SIGUSR2, "paused")
    pids = t.pids()
    iteration.pre_dump(t.root, str(tmp_path / "1"))
    meta = json.loads((tmp_path / "1" / "wpdump.json").read_text())
    meta["processes"][str(pids[1])]["start_ticks"] -= 1  # the image of pids[1] is now of an older process
    (tmp_path / "1" / "wpdump.json").write_text(json.dumps(meta))
    r = iteration.pre_dump(t.root, str(tmp_path / "2"), "../1")
    assert present(tmp_path / "2", pids[1], PE_PARENT) == 0 and present(tmp_path / "2", pids[1]) > 64
    assert present(tmp_path / "2", pids[2], PE_PARENT) > 64 and present(tmp_path / "2", pids[2]) < 16
    assert r.incremental  # of every process the parent holds an image of; the new one is written in full
    iteration.dump(t.root, str(tmp_path / "3"), "../2", leave_stopped=True)  # the chain through 2, compared frozen
    try:
        for p in pids:
            compare_with_memory(str(tmp_path / "3"), p)
    finally:
        cont_all(pids)


def test_single_leaves_the_children_out(prefork, tmp_path):
    t = prefork(workers=2, private=16, shared=16)
    r = iteration.pre_dump(t.root, str(tmp_path / "1"), single=True)
    assert r.processes == 1 and vpids_in(tmp_path / "1") == {t.root}


def test_tree_in_its_own_pid_namespace_restored_by_criu(prefork, tmp_path):
    """The prefork tree as a container's: pid namespace, images named by vpid; criu dump with the hook keeps only
    what changed since the last pre-dump, for every process; criu restore brings the whole tree back, each
    process passing its self-check."""
    if not CRIU.exists():
        pytest.fail(f"{CRIU} is missing: tools/setup provisions CRIU 4.x")
    t = prefork(workers=3, private=2048, shared=64, per_tick=1, pidns=True)
    assert nspids(t.root)[-1] == 1
    d = tmp_path / "ckpt"
    d.mkdir()
    iteration.pre_dump(t.root, str(d / "1"))
    assert vpids_in(d / "1") == {1, 2, 3, 4}
    with open(d / "1" / "wpdump.json") as f:
        assert json.load(f)["processes"]["1"]["pid"] == t.root
    time.sleep(0.3)
    iteration.pre_dump(t.root, str(d / "2"), "../1")
    final = d / "final"
    final.mkdir()
    criu("dump", "-t", t.root, "-D", final, "-o", "dump.log", "-v4", "--action-script", HOOK)
    log = (final / "dump.log").read_text()
    assert log.count("now in the parent") == 4, log[-4000:]
    for v in (1, 2, 3, 4):  # each process: far fewer pages than it lists (about what it wrote since d/2)
        assert present(final, v) < present(final, v, PE_PRESENT | PE_PARENT) // 4, v
    assert decode_all(final, [BIN / "crit"]) > 0
    t.proc.wait(timeout=30)  # criu dump killed the tree: unshare exits with it
    criu("restore", "-D", final, "-d", "--pidfile", tmp_path / "restored.pid", "-o", "restore.log", "-v4")
    root = int((tmp_path / "restored.pid").read_text())
    try:
        t.root = root
        assert len(read_tree(root)) == 4 and nspids(root)[-1] == 1
        first = {ln[0]: int(ln[2]) for ln in t.signal_all(signal.SIGUSR1, "ok")}
        assert set(first) == {"1", "2", "3", "4"}
        time.sleep(0.2)
        second = {ln[0]: int(ln[2]) for ln in t.signal_all(signal.SIGUSR1, "ok")}
        assert all(second[v] > first[v] for v in first), (first, second)  # it runs on
    finally:
        os.kill(root, signal.SIGKILL)


def test_two_hundred_processes(prefork, tmp_path):
    """A 200-worker tree of small processes: pre-dumps and a final dump of all 201, each equal to its memory."""
    t = prefork(workers=200, private=8, shared=0, per_tick=1)
    pids = t.pids()
    assert len(pids) == 201
    d = tmp_path / "ckpt"
    d.mkdir()
    r1 = iteration.pre_dump(t.root, str(d / "1"))
    r2 = iteration.pre_dump(t.root, str(d / "2"), "../1")
    assert r1.processes == r2.processes == 201 and r2.incremental
    r3 = iteration.dump(t.root, str(d / "3"), "../2", leave_stopped=True)
    try:
        assert r3.processes == 201 and vpids_in(d / "3") == set(pids)
        for p in pids:
            compare_with_memory(str(d / "3"), p)
    finally:
        cont_all(pids)


@pytest.fixture(scope="module")
def storm_exe(build_dir):
    return compile_target("storm", build_dir)


def test_fork_and_exit_storm_during_checkpoint(storm_exe, tmp_path):
    """Children forked and exiting every few ms while the tree is checkpointed: no lost write, no page of one
    process in another's image, the tree unharmed (every child verified itself, the master too)."""
    require_kernel()
    result = tmp_path / "result"
    proc = subprocess.Popen([str(storm_exe), str(result), "12"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 10
        while not (result.exists() and "ready" in result.read_text()) and time.time() < deadline:
            time.sleep(0.01)
        d = tmp_path / "ckpt"
        hist = checkpoint.checkpoint(proc.pid, str(d), checkpoint.PHaulPolicy(max_iterations=5), interval=0.05,
                                     leave_stopped=True)
        final = pathlib.Path(hist[-1].images_dir)
        frozen = [m.pid for m in read_tree(proc.pid)]
        try:
            assert vpids_in(final) == set(frozen) and len(frozen) > 1
            for p in frozen:
                compare_with_memory(str(final), p)
        finally:
            cont_all(frozen)
        lines = len(result.read_text().splitlines())
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGUSR1)
        deadline = time.time() + 10
        while len(result.read_text().splitlines()) <= lines and time.time() < deadline:
            time.sleep(0.01)
        last = result.read_text().splitlines()[-1].split()
        assert last[0] == "ok" and int(last[2]) == 0 and int(last[1]) > 50, last  # forks went on, none failed
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
