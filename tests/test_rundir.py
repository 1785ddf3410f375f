"""The run directory (keepers' sockets, locks, logs) and use as an ordinary user."""

from __future__ import annotations

import os
import pathlib
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time

import pytest
import wpdump
from conftest import Target, require_kernel
from test_iteration_errors import one_line_error
from wpdump.target.process import read_stat
from wpdump.tracking import keeper

NOBODY = 65534
PLUGIN = pathlib.Path(wpdump.__file__).resolve().parent.parent


def wpdump_cli(*args: object, env: dict | None = None, user: int | None = None,
               python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "wpdump.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env, user=user, group=user, extra_groups=[] if user else None,
                          cwd="/")


def wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}") and read_stat(pid).state not in ("Z", "X"):
        assert time.monotonic() < deadline, f"pid {pid} did not exit"
        time.sleep(0.01)


def test_run_dir_holds_only_live_work(target, run_dir, tmp_path):
    """Files are keyed PID-STARTTICKS; locks exist only while held, a keeper's socket and log only while it runs."""
    ticks = read_stat(target.pid).start_ticks
    live = [f"{target.pid}-{ticks}.log", f"{target.pid}-{ticks}.sock"]
    assert wpdump_cli("pre-dump", "-t", target.pid, "-D", tmp_path / "1").returncode == 0
    assert sorted(os.listdir(run_dir)) == live
    p = wpdump_cli("verify", "-t", target.pid, "-D", tmp_path / "1")
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(run_dir)) == live
    assert wpdump_cli("untrack", "-t", target.pid).returncode == 0
    assert os.listdir(run_dir) == []
    # a pid that was named but never attached leaves nothing either
    assert wpdump_cli("verify", "-t", target.pid, "-D", tmp_path / "1").returncode == 0
    assert os.listdir(run_dir) == []
    # the target exits: its keeper exits and removes its socket and log
    assert wpdump_cli("pre-dump", "-t", target.pid, "-D", tmp_path / "2").returncode == 0
    kpid = keeper.Keeper.connect(target.pid).status()["keeper"]
    target.kill()
    wait_gone(kpid)
    assert os.listdir(run_dir) == []


def test_unsafe_run_dir_is_refused(target, run_dir, tmp_path):
    run_dir.chmod(0o1777)
    try:
        one_line_error(wpdump_cli("pre-dump", "-t", target.pid, "-D", tmp_path / "1"), "run directory",
                       "writable by group or others")
        one_line_error(wpdump_cli("status"), "run directory")
    finally:
        run_dir.chmod(0o700)
    os.chown(run_dir, NOBODY, NOBODY)
    try:
        one_line_error(wpdump_cli("pre-dump", "-t", target.pid, "-D", tmp_path / "1"), "owned by uid 65534")
    finally:
        os.chown(run_dir, 0, 0)
    link = tmp_path / "link"
    link.symlink_to(run_dir)
    one_line_error(wpdump_cli("status", env={**os.environ, "WPDUMP_RUN_DIR": str(link)}), "symlink")
    assert not (tmp_path / "1").exists()
    assert target.alive()


def test_keeper_log_is_not_opened_through_a_symlink(target, run_dir, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    ticks = read_stat(target.pid).start_ticks
    (run_dir / f"{target.pid}-{ticks}.log").symlink_to(victim)
    p = wpdump_cli("pre-dump", "-t", target.pid, "-D", tmp_path / "1")
    assert p.returncode == 0, p.stderr  # the iteration is complete; tracking could not go on
    assert "log" in p.stderr and "tracking of pid" in p.stderr, p.stderr
    wpdump_cli("untrack", "-t", target.pid)
    time.sleep(0.2)  # a keeper, had one started, writes its last line when it exits
    assert victim.read_text() == "untouched\n"
    assert target.alive()


def _python_for_others() -> str:
    """An interpreter of this Python version that other users may execute (this one may live under /root)."""
    exe = os.path.realpath(sys.executable)
    parts = pathlib.Path(exe).parents
    if all(os.stat(d).st_mode & stat.S_IXOTH for d in parts) and os.stat(exe).st_mode & stat.S_IXOTH:
        return sys.executable
    alt = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    if not os.path.exists(alt):
        pytest.fail(f"no Python {sys.version_info.major}.{sys.version_info.minor} that other users may run")
    return alt


def test_non_root_user_checkpoints_its_own_process(memtarget_exe):
    """As an ordinary user: the run directory defaults to $XDG_RUNTIME_DIR/wpdump, the tracking works on the
    user's own process (userfaultfd in user mode), verify and restore-memory read the mapped files through their
    paths where /proc/PID/map_files is closed to the user."""
    require_kernel()
    home = tempfile.mkdtemp(prefix="wpdump-nobody-")
    try:
        os.chmod(home, 0o755)
        exe = shutil.copy(memtarget_exe, os.path.join(home, "memtarget"))
        os.chmod(exe, 0o755)
        xdg, img = os.path.join(home, "xdg"), os.path.join(home, "img")
        for d in (xdg, img):
            os.mkdir(d, 0o700)
            os.chown(d, NOBODY, NOBODY)
        env = {"HOME": home, "PATH": "/usr/bin:/bin", "XDG_RUNTIME_DIR": xdg,
               "PYTHONPATH": os.pathsep.join([sysconfig.get_paths()["purelib"], str(PLUGIN)])}
        py = _python_for_others()
        t = Target(pathlib.Path(exe), user=NOBODY)
        try:
            a = t.map(64)
            t.cmd("fill", hex(a), 64, 7)

            def run(*args: object) -> subprocess.CompletedProcess:
                p = wpdump_cli(*args, env=env, user=NOBODY, python=py)
                assert p.returncode == 0, (args, p.stdout, p.stderr)
                return p

            run("pre-dump", "-t", t.pid, "-D", f"{img}/1")
            assert str(t.pid) in run("status").stdout
            t.cmd("fill", hex(a), 8, 9)
            t.wait_idle()
            run("dump", "-t", t.pid, "-D", f"{img}/2", "--prev-images-dir", "../1")
            p = run("verify", "-t", t.pid, "-D", f"{img}/2")
            assert "mapped file" not in p.stdout, p.stdout  # (an rseq note may come: the target ran meanwhile)
            run("restore-memory", "-t", t.pid, "-D", f"{img}/2")
            st = os.stat(os.path.join(xdg, "wpdump"))
            assert st.st_uid == NOBODY and stat.S_IMODE(st.st_mode) == 0o700
            assert os.listdir(os.path.join(xdg, "wpdump")) == []  # nothing tracked, nothing left
            assert t.alive()
        finally:
            t.kill()
    finally:
        shutil.rmtree(home)
