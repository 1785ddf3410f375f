"""Bad input and failures: one clear line, a non-zero exit, nothing half-written, the target unharmed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from chaincheck import compare_with_memory
from conftest import Target, default_sigint, unavailable
from wpdump.dump import iteration
from wpdump.images import chain
from wpdump.tracking import keeper

PAGE = 4096


def wpdump(*args: object, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "wpdump.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def one_line_error(p: subprocess.CompletedProcess, *words: str) -> str:
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wpdump: "), p.stderr
    assert "Traceback" not in p.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def leftovers(d) -> list[str]:
    return [n for n in os.listdir(d) if ".wpdump-" in n]


def assert_unharmed(t: Target) -> None:
    assert t.alive()
    with open(f"/proc/{t.pid}/smaps") as f:
        assert " uw" not in f.read(), "the target is still registered with a userfaultfd"
    a = t.map(1)
    t.cmd("poke", hex(a), "0")


def test_no_such_pid(tmp_path):
    p = wpdump("pre-dump", "-t", 999999, "-D", tmp_path / "1")
    one_line_error(p, "no such process", "999999")
    assert not (tmp_path / "1").exists() and not leftovers(tmp_path)


def test_images_dir_not_empty(target, tmp_path):
    d = tmp_path / "1"
    d.mkdir()
    (d / "something").write_text("x")
    one_line_error(wpdump("pre-dump", "-t", target.pid, "-D", d), "exists and is not empty")
    assert keeper.tracked_pids() == []
    assert_unharmed(target)
    os.symlink(tmp_path / "empty", tmp_path / "link")
    (tmp_path / "empty").mkdir()
    one_line_error(wpdump("pre-dump", "-t", target.pid, "-D", tmp_path / "link"), "symlink")
    assert os.listdir(tmp_path / "empty") == []


def test_empty_existing_dir_is_used_as_criu_does(target, tmp_path):
    (tmp_path / "1").mkdir()
    p = wpdump("pre-dump", "-t", target.pid, "-D", tmp_path / "1")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "1" / f"pagemap-{target.pid}.img").exists()


def test_bad_prev_images_dir(target, memtarget_exe, tmp_path):
    a = target.map(8)
    target.cmd("fill", hex(a), 8, 1)
    one_line_error(wpdump("pre-dump", "-t", target.pid, "-D", tmp_path / "2", "--prev-images-dir", "../nope"),
                   "does not exist")
    (tmp_path / "junk").mkdir()
    one_line_error(wpdump("pre-dump", "-t", target.pid, "-D", tmp_path / "2", "--prev-images-dir", "../junk"),
                   "pagemap")
    # a corrupt parent
    assert wpdump("pre-dump", "-t", target.pid, "-D", tmp_path / "1").returncode == 0
    other = Target(memtarget_exe)  # started after the dump of 1
    try:
        one_line_error(wpdump("pre-dump", "-t", other.pid, "-D", tmp_path / "2", "--prev-images-dir", "../1"),
                       f"pagemap-{other.pid}.img")
        # the pid "reused": the parent's pagemap renamed to the other pid. Our metadata names the process...
        shutil.copytree(tmp_path / "1", tmp_path / "r")
        os.rename(tmp_path / "r" / f"pagemap-{target.pid}.img", tmp_path / "r" / f"pagemap-{other.pid}.img")
        one_line_error(wpdump("pre-dump", "-t", other.pid, "-D", tmp_path / "2", "--prev-images-dir", "../r"),
                       "another process")
        # ... and without it CRIU's own check applies: the parent was dumped before the process started
        os.unlink(tmp_path / "r" / chain.META_FILE)
        one_line_error(wpdump("pre-dump", "-t", other.pid, "-D", tmp_path / "2", "--prev-images-dir", "../r"),
                       "reused")
        assert_unharmed(other)
    finally:
        other.kill()
    with open(tmp_path / "1" / f"pagemap-{target.pid}.img", "r+b") as f:
        f.seek(0)
        f.write(b"\0\0\0\0")
    one_line_error(wpdump("pre-dump", "-t", target.pid, "-D", tmp_path / "2", "--prev-images-dir", "../1"),
                   "magic")
    assert not (tmp_path / "2").exists() and not leftovers(tmp_path)


@pytest.fixture
def small_fs():
    d = tempfile.mkdtemp(prefix="wpdump-smallfs-")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", d], capture_output=True, text=True)
    if r.returncode != 0:
        unavailable(f"cannot mount a tmpfs for the disk-full test (not root?): {r.stderr.strip()}")
    yield d
    subprocess.run(["umount", "-l", d], check=False)
    os.rmdir(d)


def test_disk_full(target, tmp_path, small_fs):
    a = target.map(1024)
    target.cmd("fill", hex(a), 1024, 3)  # 4 MiB: more than the 2 MiB file system holds
    one_line_error(wpdump("pre-dump", "-t", target.pid, "-D", os.path.join(small_fs, "1")), "disk full")
    assert os.listdir(small_fs) == []  # nothing half-written, no temporary directory
    assert keeper.tracked_pids() == []
    assert_unharmed(target)
    # a complete parent elsewhere; the next iteration fails for lack of space after its harvest
    assert iteration.pre_dump(target.pid, str(tmp_path / "1")).pages_written >= 1024
    target.cmd("fill", hex(a), 1024, 4)
    one_line_error(wpdump("pre-dump", "-t", target.pid, "-D", os.path.join(small_fs, "2"), "--prev-images-dir",
                          tmp_path / "1"), "disk full")
    assert os.listdir(small_fs) == []
    chain.load_chain(str(tmp_path / "1"), target.pid)  # the parent is intact
    # that harvest's dirty information is gone with the failed iteration: the next one is full
    os.kill(target.pid, signal.SIGSTOP)
    try:
        r = iteration.pre_dump(target.pid, str(tmp_path / "2"), "../1")
        assert not r.incremental and r.warnings and r.pages_parent == 0
        compare_with_memory(str(tmp_path / "2"), target.pid)
    finally:
        os.kill(target.pid, signal.SIGCONT)


def test_permission_denied(memtarget_exe, tmp_path):
    d = tempfile.mkdtemp(prefix="wpdump-nobody-")
    try:
        os.chmod(d, 0o755)
        exe = shutil.copy(memtarget_exe, os.path.join(d, "memtarget"))
        os.chmod(exe, 0o755)
        t = Target(exe, user=65534)
        try:
            # root without CAP_SYS_PTRACE may not trace another user's process
            no_ptrace = ("setpriv", "--bounding-set", "-sys_ptrace")
            p = wpdump("pre-dump", "-t", t.pid, "-D", tmp_path / "1", prefix=no_ptrace)
            one_line_error(p, "permission denied", str(t.pid))
            assert not (tmp_path / "1").exists() and not leftovers(tmp_path)
            assert_unharmed(t)
        finally:
            t.kill()
    finally:
        shutil.rmtree(d)


def test_interrupted_iteration_leaves_no_dir(memtarget_exe, tmp_path):
    t = Target(memtarget_exe)
    try:
        a = t.map(256 * 256)
        t.cmd("fill", hex(a), 256 * 256, 5)  # 256 MiB: the copy takes a while
        for _ in range(10):  # until SIGINT lands mid-iteration (a fast disk may finish first)
            p = subprocess.Popen([sys.executable, "-m", "wpdump.cli", "pre-dump", "-t", str(t.pid), "-D",
                                  str(tmp_path / "1")], stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
            deadline = time.time() + 30
            while not leftovers(tmp_path) and time.time() < deadline and p.poll() is None:
                time.sleep(0.001)
            p.send_signal(signal.SIGINT)
            _, err = p.communicate(timeout=60)
            if p.returncode != 0:
                break
            shutil.rmtree(tmp_path / "1")
            iteration.untrack(t.pid)
        else:
            raise AssertionError("ten iterations completed before SIGINT arrived")
        assert p.returncode == 130 and "Traceback" not in err
        assert not (tmp_path / "1").exists() and not leftovers(tmp_path)
        assert keeper.tracked_pids() == []
        assert_unharmed(t)
        # SIGKILL leaves a temporary directory behind; the next writer removes it
        p = subprocess.Popen([sys.executable, "-m", "wpdump.cli", "pre-dump", "-t", str(t.pid), "-D",
                              str(tmp_path / "1")])
        while not leftovers(tmp_path) and p.poll() is None:
            time.sleep(0.002)
        p.kill()
        p.wait()
        assert not (tmp_path / "1").exists()
        time.sleep(0.1)
        assert_unharmed(t)
        assert wpdump("pre-dump", "-t", t.pid, "-D", tmp_path / "1").returncode == 0
        assert not leftovers(tmp_path)
    finally:
        t.kill()


def test_cli_checkpoint_runs_the_loop(target, tmp_path):
    a = target.map(64)
    target.cmd("fill", hex(a), 64, 1)
    target.cmd("threads", 1, hex(a), 64)
    try:
        p = wpdump("checkpoint", "-t", target.pid, "-D", tmp_path / "cp", "--max-iterations", 3, "--leave-stopped")
        assert p.returncode == 0, p.stderr
        lines = p.stdout.splitlines()
        assert lines[0].split()[:3] == ["iter", "kind", "scanned"]
        kinds = [ln.split()[1] for ln in lines[1:] if ln.split()[0].isdigit()]
        assert kinds == ["pre-dump"] * (len(kinds) - 1) + ["dump"] and 2 <= len(kinds) <= 4
        top = tmp_path / "cp" / str(len(kinds))
        compare_with_memory(str(top), target.pid)  # left stopped: the writer threads are frozen too
    finally:
        os.kill(target.pid, signal.SIGCONT)
        target.cmd("stopthreads")
    p = wpdump("checkpoint", "-t", target.pid, "-D", tmp_path / "cp2", "--max-iterations", 2, "--json")
    rows = [__import__("json").loads(ln) for ln in p.stdout.splitlines()]
    assert rows[-1]["kind"] == "dump" and rows[0]["kind"] == "pre-dump" and "stop_reason" in rows[-2]
    p = wpdump("status")
    assert p.returncode == 0 and "no process is tracked" in p.stdout
    one_line_error(wpdump("untrack", "-t", target.pid), "not tracked")


def test_a_broken_level_below_the_parent_is_refused(target, tmp_path):
    """The levels below the parent are checked by a short walk (a stat and a readlink a level); anything amiss
    there is refused with the walk's words: a missing level, a loop, a level without this process's pagemap."""
    a = target.map(4)
    target.cmd("fill", hex(a), 4, 1)
    for i, prev in ((1, None), (2, "../1"), (3, "../2")):
        iteration.pre_dump(target.pid, str(tmp_path / str(i)), prev)
    link = tmp_path / "2" / "parent"
    pagemap = tmp_path / "1" / f"pagemap-{target.pid}.img"
    cases = (
        ("missing level", lambda: (link.unlink(), link.symlink_to("../gone")), "does not exist",
         f"parent of {tmp_path / '2'}"),
        ("loop", lambda: (link.unlink(), link.symlink_to("../3")), "loop", str(tmp_path / "3")),
        ("no pagemap", lambda: (link.unlink(), link.symlink_to("../1"), pagemap.rename(pagemap.with_suffix(".x"))),
         f"holds no pagemap-{target.pid}.img", str(tmp_path / "1")),
    )
    for n, (what, breaking, *words) in enumerate(cases):
        breaking()
        p = wpdump("pre-dump", "-t", target.pid, "-D", tmp_path / f"x{n}", "--prev-images-dir", "../3")
        one_line_error(p, *words)
        assert not (tmp_path / f"x{n}").exists() and not leftovers(tmp_path), what
    pagemap.with_suffix(".x").rename(pagemap)
    r = iteration.pre_dump(target.pid, str(tmp_path / "4"), "../3")  # whole again: the chain is used
    assert r.incremental, r.warnings
