"""Where pages could be lost without a word: a second tracker, the target's own userfaultfd, memfd_secret
memory, and direct I/O into buffers pinned before a harvest. Each ends in an error naming the problem or a
chain equal to memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from chaincheck import compare_with_memory, reconstruct
from conftest import PAGE, compile_target
from test_iteration_errors import one_line_error, wpdump
from test_iterations import stop_and_wait
from wpdump.errors import AlreadyTracked, TargetUsesUserfaultfd
from wpdump.target import procfds
from wpdump.tracking import keeper
from wpdump.tracking.tracker import Tracker


def dump_equals_memory(target, images_dir, *args: str) -> subprocess.CompletedProcess:
    """``wpdump dump --leave-stopped`` into ``images_dir``, then the chain compared with the stopped target."""
    p = wpdump("dump", "-t", target.pid, "-D", images_dir, "--leave-stopped", *args)
    assert p.returncode == 0, p.stderr
    try:
        stop_and_wait(target.pid)
        compare_with_memory(str(images_dir), target.pid)
    finally:
        os.kill(target.pid, signal.SIGCONT)
    return p


def uffd_fds(pid: int) -> int:
    return len(procfds.userfaultfds(pid))


def test_second_tracker_is_refused(target, tmp_path, run_dir):
    a = target.map(64)
    target.cmd("fill", hex(a), 64, 1)
    # in one process: a second Tracker of a tracked pid
    with Tracker(target.pid):
        with pytest.raises(AlreadyTracked) as exc:
            Tracker(target.pid)
        assert exc.value.pid == target.pid and "already tracked" in str(exc.value)
    # across run directories: a keeper under another WPDUMP_RUN_DIR is another tracker
    assert wpdump("pre-dump", "-t", target.pid, "-D", tmp_path / "1").returncode == 0
    other = tmp_path / "other-run"
    other.mkdir(mode=0o700)
    env = {**os.environ, "WPDUMP_RUN_DIR": str(other)}
    p = subprocess.run([sys.executable, "-m", "wpdump.cli", "pre-dump", "-t", str(target.pid), "-D",
                        str(tmp_path / "x")], capture_output=True, text=True, env=env, timeout=120)
    one_line_error(p, "already tracked", str(target.pid))
    assert not (tmp_path / "x").exists() and not [n for n in os.listdir(other) if n.endswith(".sock")]
    # the first tracker recognises its own registration and goes on incrementally
    target.cmd("poke", hex(a), "3,30")
    p = wpdump("pre-dump", "-t", target.pid, "-D", tmp_path / "2", "--prev-images-dir", "../1", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.splitlines()[-1])["incremental"]
    target.cmd("poke", hex(a), "4,40")
    target.wait_idle()
    dump_equals_memory(target, tmp_path / "3", "--prev-images-dir", "../2")
    assert keeper.tracked_pids() == []


def test_target_using_userfaultfd_is_refused_unless_allowed(target, tmp_path):
    a = target.map(32)
    target.cmd("fill", hex(a), 32, 2)
    target.cmd("uffd", hex(a + 8 * PAGE), 8)
    before = uffd_fds(target.pid)
    with pytest.raises(TargetUsesUserfaultfd) as exc:
        Tracker(target.pid)
    assert exc.value.pid == target.pid
    line = one_line_error(wpdump("pre-dump", "-t", target.pid, "-D", tmp_path / "1"), "uses userfaultfd itself",
                          "--allow-userfaultfd-target")
    assert str(target.pid) in line and not (tmp_path / "1").exists()
    # refused before anything was done to it: no tracer, no extra userfaultfd, and it registers more memory
    with open(f"/proc/{target.pid}/status") as f:
        assert "TracerPid:\t0\n" in f.read()
    assert uffd_fds(target.pid) == before
    b = target.map(8)
    target.cmd("fill", hex(b), 8, 3)  # every page present: its MISSING-mode registration never fires
    target.cmd("uffd", hex(b), 8)
    # allowed: tracked, its registered ranges dumped whole, and the chain equals memory
    p = wpdump("pre-dump", "-t", target.pid, "-D", tmp_path / "2", "--allow-userfaultfd-target")
    assert p.returncode == 0, p.stderr
    target.cmd("poke", hex(a), "1,9,20")
    target.wait_idle()
    dump_equals_memory(target, tmp_path / "3", "--prev-images-dir", "../2", "--allow-userfaultfd-target")
    assert "um" in target.smaps_flags(b)


def test_secret_memory_fails_the_dump_unless_allowed(target, tmp_path):
    s = target.addr("secret", 4)
    a = target.map(16)
    target.cmd("fill", hex(a), 16, 4)
    for cmd in ("pre-dump", "dump"):
        line = one_line_error(wpdump(cmd, "-t", target.pid, "-D", tmp_path / cmd), "memfd_secret", f"{s:#x}")
        assert "--allow-unreadable" in line and not (tmp_path / cmd).exists()
    assert keeper.tracked_pids() == []
    p = dump_equals_memory(target, tmp_path / "lost", "--allow-unreadable")  # every readable page
    assert "memfd_secret" in p.stderr and "lost" in p.stderr
    with open(tmp_path / "lost" / "wpdump.json") as f:
        lost = json.load(f)["processes"][str(target.pid)]["lost"]  # per process of the tree
        assert [tuple(x[:2]) for x in lost] == [(s, s + 4 * PAGE)]


@pytest.fixture
def slowfuse(build_dir, tmp_path):
    """A FUSE file of 64 pages opened with direct I/O whose reads are answered on demand."""
    exe = compile_target("slowfuse", build_dir)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    srv = subprocess.Popen([str(exe), str(mnt), "64"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                           bufsize=1)
    assert srv.stdout.readline().strip() == "ready"
    yield srv, mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)
    srv.kill()
    srv.wait()


def test_direct_io_read_in_flight_is_copied_again(target, tmp_path, slowfuse):
    """A read pins its buffer, a pre-dump re-protects it, the data lands afterwards through the kernel's
    mapping (never reported written): the next iteration copies the buffer again."""
    srv, mnt = slowfuse
    buf = target.map(16)
    target.cmd("fill", hex(buf), 16, 5)
    assert wpdump("pre-dump", "-t", target.pid, "-D", tmp_path / "1").returncode == 0
    target.cmd("bgread", mnt / "data", hex(buf), 16)
    assert srv.stdout.readline().split()[0] == "read"  # the buffer is pinned and the read waits for us
    target.wait_idle()
    p = wpdump("pre-dump", "-t", target.pid, "-D", tmp_path / "2", "--prev-images-dir", "../1")
    assert p.returncode == 0, p.stderr
    srv.stdin.write("go\n")
    srv.stdin.flush()
    assert target.cmd("joinread") == [str(16 * PAGE)]
    target.wait_idle()
    want = bytes(((k * 7 + 0x5A) & 0xFF) for k in range(16 * PAGE))
    assert target.read_mem(buf, 16 * PAGE) == want
    dump_equals_memory(target, tmp_path / "3", "--prev-images-dir", "../2")


@pytest.mark.parametrize("zap", ["dontneed", "truncate"])
def test_zapped_cow_page_of_a_private_file_mapping_right_after_attach(target, tmp_path, zap):
    """Pages copied-on-write in a MAP_PRIVATE file mapping, then zapped (MADV_DONTNEED, or the file truncated
    under them) right after the first pre-dump: the kernel keeps their write-protect markers and never reports
    them written (docs/kernel.md rule 20). The attach must record the COW set, so the next iteration knows them
    for file content again (before: the dump kept the old COW data, verify found 4 pages differing)."""
    f = tmp_path / "data"
    f.write_bytes(bytes((k * 3) & 0xFF for k in range(16 * PAGE)))
    a = target.addr("mapfile", f, 16, "private")
    target.cmd("poke", hex(a), "2,3,9,10")  # copied on write
    target.wait_idle()
    assert wpdump("pre-dump", "-t", target.pid, "-D", tmp_path / "1").returncode == 0
    if zap == "dontneed":
        target.cmd("madvise", hex(a + 2 * PAGE), 9, "dontneed")
    else:
        os.truncate(f, 8 * PAGE)  # pages 8-15 are gone from the file, their COW copies too
    target.wait_idle()
    if zap == "dontneed":
        dump_equals_memory(target, tmp_path / "2", "--prev-images-dir", "../1")
    else:  # pages past the new end of the file cannot be read (SIGBUS): compare the first half
        p = wpdump("dump", "-t", target.pid, "-D", tmp_path / "2", "--prev-images-dir", "../1", "--leave-stopped")
        assert p.returncode == 0, p.stderr
        try:
            stop_and_wait(target.pid)
            image, _ = reconstruct(str(tmp_path / "2"), target.pid)
            for i in range(16):
                want = target.read_mem(a + i * PAGE, PAGE) if i < 8 else None
                assert image.get(a + i * PAGE, want) == want, f"page {i}"
        finally:
            os.kill(target.pid, signal.SIGCONT)
    # restore-memory to the first pre-dump puts the copied-on-write pages back
    if zap == "dontneed":
        target.cmd("poke", hex(a), "2,3,9,10")
        target.wait_idle()
        assert wpdump("pre-dump", "-t", target.pid, "-D", tmp_path / "3").returncode == 0
        before = target.read_mem(a, 16 * PAGE)
        target.cmd("madvise", hex(a + 2 * PAGE), 9, "dontneed")
        target.wait_idle()
        assert target.read_mem(a, 16 * PAGE) != before
        p = wpdump("restore-memory", "-t", target.pid, "-D", tmp_path / "3")
        assert p.returncode == 0, p.stderr
        assert target.read_mem(a, 16 * PAGE) == before
