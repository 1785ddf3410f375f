"""What a new user meets on the command line: help, names, messages, Ctrl-C (the CLI run as a real process)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import Target, default_sigint, require_kernel
from test_iteration_errors import one_line_error
from test_rundir import NOBODY, PLUGIN, _python_for_others
from wpdump.target.process import thread_state, threads
from wpdump.tracking import keeper

WPDUMP = [sys.executable, "-m", "wpdump.cli"]
COMMANDS = ["pre-dump", "dump", "checkpoint", "restore-memory", "criu-hook", "status", "untrack", "show", "decode",
            "verify", "squash", "dedup", "track", "demo"]


def run(*args: object, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*WPDUMP, *map(str, args)], capture_output=True, text=True, timeout=120, **kw)


def running(pid: int) -> bool:
    return all(thread_state(pid, t) not in ("T", "t") for t in threads(pid))


# ---------------------------------------------------------------------------------------------- names, help


def test_version_and_help_of_every_command():
    from importlib.metadata import version

    p = run("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"wpdump {version('wpdump')}", p.stdout
    top = run("--help").stdout
    for name in COMMANDS:
        assert name in top
        h = run(name, "--help")
        assert h.returncode == 0, h.stderr
        ex = h.stdout.split("example:\n", 1)
        assert len(ex) == 2 and f"wpdump {name}" in ex[1].replace("wpdump-criu-hook", "wpdump criu-hook"), h.stdout
        assert "SUPPRESS" not in h.stdout and "--target" not in h.stdout and "--out " not in h.stdout
    # CRIU's names: -t/--tree PID wherever a process is named, -o/--log-file everywhere it logs
    for name in ("pre-dump", "dump", "checkpoint", "restore-memory", "untrack", "track", "verify"):
        h = run(name, "--help").stdout
        assert "-t PID, --tree PID" in h, (name, h)
        assert "PID" in h.split("--tree PID", 1)[1].split("\n", 1)[1] or "process" in h.split("--tree PID", 1)[1]
    for name in ("pre-dump", "dump", "checkpoint", "show", "verify", "squash", "dedup", "demo", "status"):
        assert "-o FILE, --log-file FILE" in run(name, "--help").stdout, name
    assert "-O OUT, --output-dir OUT" in run("squash", "--help").stdout
    assert "--json" in run("demo", "--help").stdout


def test_importing_the_cli_loads_only_the_standard_library():
    """A Ctrl-C during start-up lands in main()'s handler: nothing slow is imported before it."""
    p = subprocess.run([sys.executable, "-c", "import sys, wpdump.cli; "
                        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'cffi', 'google') "
                        "or m.startswith('wpdump.') and m != 'wpdump.cli'))"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr


def test_track_takes_tree_and_old_target(target):
    for opt in ("-t", "--tree", "--target"):
        p = run("track", opt, target.pid, "--rounds", 1, "--interval", 0.05, "--json")
        assert p.returncode == 0 and len(p.stdout.splitlines()) == 2, (opt, p.stderr)


def test_squash_output_dir_and_log_file(target, tmp_path):
    a = target.map(16)
    target.cmd("fill", hex(a), 16, 3)
    assert run("pre-dump", "-t", target.pid, "-D", tmp_path / "1").returncode == 0
    log = tmp_path / "squash.log"
    p = run("squash", "-D", tmp_path / "1", "-O", tmp_path / "flat", "-o", log)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "flat" / f"pagemap-{target.pid}.img").exists() and "squash" in log.read_text()
    p = run("squash", "-D", tmp_path / "1", "--out", tmp_path / "flat2")  # the old long spelling
    assert p.returncode == 0 and (tmp_path / "flat2").is_dir(), p.stderr
    p = run("squash", "-D", tmp_path / "1", "-o", tmp_path / "flat3")  # -o is the log file: OUT is missing
    assert p.returncode == 2 and "-O/--output-dir" in p.stderr and not (tmp_path / "flat3").exists()


def test_demo_json_and_its_directory(tmp_path):
    require_kernel()
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    p = run("demo", "--mib", 8, "--rounds", 2, "--interval", 0.1, "--json", env=env)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(ln) for ln in p.stdout.splitlines()]
    assert [r["kind"] for r in rows[:-1]] == ["pre-dump"] * (len(rows) - 2) + ["dump"]
    assert rows[-1]["verified"] is True and rows[-1]["images_dir"] is None
    assert os.listdir(tmp_path) == []  # the temporary chain is removed
    p = run("demo", "--mib", 8, "--rounds", 1, "--interval", 0.1, "--keep", env=env)
    assert p.returncode == 0, p.stderr
    [kept] = os.listdir(tmp_path)
    assert f"wpdump show -D {tmp_path / kept / 'checkpoint'}" in p.stdout
    p = run("demo", "--mib", 8, "--rounds", 1, "--interval", 0.1, "-D", tmp_path / "mine")
    assert p.returncode == 0 and (tmp_path / "mine" / "2" / "wpdump.json").exists(), p.stderr


# ---------------------------------------------------------------------------------------------- messages


def test_checkpoint_directory_is_understood(target, tmp_path):
    a = target.map(32)
    target.cmd("fill", hex(a), 32, 4)
    root = tmp_path / "cp"
    p = run("checkpoint", "-t", target.pid, "-D", root, "--max-iterations", 2)
    assert p.returncode == 0, p.stderr
    n = len([d for d in os.listdir(root) if d.isdigit()])
    p = run("show", "-D", root)  # the whole checkpoint: its top and the levels below
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.splitlines()) == 1 + n and p.stdout.splitlines()[1].endswith(str(root / str(n)))
    assert run("show", root).stdout == p.stdout  # the old positional spelling
    p = run("verify", "-D", root)
    assert p.returncode == 0 and f"chain of {n} iterations is sound" in p.stdout, p.stdout + p.stderr
    line = one_line_error(run("squash", "-D", root, "-O", tmp_path / "flat"), "checkpoint directory",
                          f"e.g. {root / str(n)}")
    assert "iterations 1, 2" in line


def test_unreadable_is_not_missing(target, tmp_path):
    """As an ordinary user, a directory one may not enter is 'Permission denied', not 'does not exist'."""
    assert run("pre-dump", "-t", target.pid, "-D", tmp_path / "1").returncode == 0
    os.chmod(tmp_path, 0o700)  # root's: closed to others
    env = {"HOME": "/", "PATH": "/usr/bin:/bin", "WPDUMP_RUN_DIR": "/nonexistent",
           "PYTHONPATH": os.pathsep.join([__import__("sysconfig").get_paths()["purelib"], str(PLUGIN)])}
    for cmd in (("show", "-D", tmp_path / "1"), ("verify", "-D", tmp_path / "1"),
                ("pre-dump", "-t", os.getpid(), "-D", tmp_path / "2")):
        p = subprocess.run([_python_for_others(), "-m", "wpdump.cli", *map(str, cmd)], capture_output=True,
                           text=True, timeout=120, env=env, user=NOBODY, group=NOBODY, extra_groups=[], cwd="/")
        line = one_line_error(p, "Permission denied")
        assert "does not exist" not in line


def test_checkpoint_that_fails_at_once_prints_no_table(tmp_path):
    from test_cli import unused_pid

    p = run("checkpoint", "-t", unused_pid(), "-D", tmp_path / "cp")
    one_line_error(p, "no such process")
    assert p.stdout == "" and not (tmp_path / "cp").exists()
    (tmp_path / "mine").mkdir()  # an empty directory the user made stays
    one_line_error(run("checkpoint", "-t", unused_pid(), "-D", tmp_path / "mine"), "no such process")
    assert (tmp_path / "mine").is_dir()


def test_standalone_rows_are_numbered_by_depth(target, tmp_path):
    rows = []
    for i, extra in enumerate([(), ("--prev-images-dir", "../1"), ("--prev-images-dir", "../2")], 1):
        p = run("dump" if i == 3 else "pre-dump", "-t", target.pid, "-D", tmp_path / str(i), *extra)
        assert p.returncode == 0, p.stderr
        rows.append(p.stdout.splitlines()[1].split()[:2])
    assert rows == [["1", "pre-dump"], ["2", "pre-dump"], ["3", "dump"]]


def test_verbose_and_log_file_record_the_work_and_warn_once(target, tmp_path):
    log = tmp_path / "wpdump.log"
    p = run("pre-dump", "-t", target.pid, "-D", tmp_path / "1", "-v", "-o", log)
    assert p.returncode == 0, p.stderr
    assert "attaching" in p.stderr  # -v: what is done
    text = log.read_text()
    assert f"pre-dump -t {target.pid}" in text and "iteration 1" in text and "exit status 0" in text, text
    assert run("untrack", "-t", target.pid).returncode == 0
    p = run("pre-dump", "-t", target.pid, "-D", tmp_path / "2", "--prev-images-dir", "../1", "-vvv", "-o", log)
    assert p.returncode == 0, p.stderr
    warning = "is not tracked since the parent"
    said = [ln for ln in p.stderr.splitlines() if warning in ln]
    assert len(said) == 1 and said[0].startswith("wpdump: warning: "), p.stderr  # once, at any verbosity
    assert warning in log.read_text()
    one_line_error(run("pre-dump", "-t", target.pid, "-D", tmp_path / "2", "-o", log), "not empty")
    assert "Traceback" in log.read_text()  # the log file has the error with its traceback


def test_status_counts_restores_apart(target, tmp_path):
    a = target.map(16)
    target.cmd("fill", hex(a), 16, 3)
    target.wait_idle()
    assert run("pre-dump", "-t", target.pid, "-D", tmp_path / "1").returncode == 0
    target.cmd("fill", hex(a), 4, 8)
    target.wait_idle()
    p = run("restore-memory", "-t", target.pid, "-D", tmp_path / "1")
    assert p.returncode == 0 and "(tracked)" in p.stdout, p.stdout + p.stderr
    [row] = json.loads(run("status", "--json").stdout)
    assert row["checkins"] == 1 and row["restores"] == 1
    assert "restores" in run("status").stdout


def test_layout_refusal_reads_well(target, tmp_path):
    a = target.map(8)
    target.cmd("fill", hex(a), 8, 3)
    assert run("pre-dump", "-t", target.pid, "-D", tmp_path / "1").returncode == 0
    target.cmd("munmap", hex(a), 8)
    line = one_line_error(run("restore-memory", "-t", target.pid, "-D", tmp_path / "1"), "the layout changed")
    assert "  " not in line


# ---------------------------------------------------------------------------------------------- Ctrl-C


def _start_checkpoint(t: Target, d: pathlib.Path, *extra: str) -> subprocess.Popen:
    """A checkpoint that pauses an hour between pre-dumps: a signal after the first row lands in the pause."""
    p = subprocess.Popen([*WPDUMP, "checkpoint", "-t", str(t.pid), "-D", str(d), "--interval", "3600", *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    assert p.stdout.readline().split()[:2] == ["iter", "kind"]
    assert p.stdout.readline().split()[:2] == ["1", "pre-dump"]
    return p


def _interrupt(p: subprocess.Popen, sig: int) -> str:
    """Send ``sig``; the command's stderr once it has exited (killed if it does not within a minute)."""
    p.send_signal(sig)
    try:
        return p.communicate(timeout=60)[1]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_checkpoint_ends_tracking_and_says_so(target, tmp_path, sig):
    a = target.map(64)
    target.cmd("fill", hex(a), 64, 3)
    p = _start_checkpoint(target, tmp_path / "cp")
    assert keeper.tracked_pids() == [target.pid]
    err = _interrupt(p, sig)
    assert p.returncode == 128 + sig, (p.returncode, err)
    assert "Traceback" not in err
    [line] = err.strip().splitlines()
    assert line == (f"wpdump: interrupted ({sig.name}): pid {target.pid} not tracked, running; "
                    f"{tmp_path / 'cp' / '1'} written (pre-dumps), no final dump"), line
    assert keeper.tracked_pids() == []  # checkpoint promised tracking would end with it
    assert running(target.pid) and target.alive()
    assert run("verify", "-D", tmp_path / "cp" / "1").returncode == 0  # what was written is a sound iteration


def test_interrupted_checkpoint_keeps_tracking_when_asked(target, tmp_path):
    p = _start_checkpoint(target, tmp_path / "cp", "--keep-tracking")
    err = _interrupt(p, signal.SIGINT)
    assert p.returncode == 130 and "Traceback" not in err
    assert f"pid {target.pid} tracked since {tmp_path / 'cp' / '1'}, running" in err, err
    assert keeper.tracked_pids() == [target.pid]


def test_interrupted_dump_keep_tracking_says_tracking_was_lost(memtarget_exe, tmp_path):
    t = Target(memtarget_exe)
    try:
        a = t.map(256 * 256)
        t.cmd("fill", hex(a), 256 * 256, 5)  # 256 MiB: the copy takes a while
        prev = tmp_path / "1"
        assert run("pre-dump", "-t", t.pid, "-D", prev).returncode == 0
        for i in range(10):  # until SIGINT lands mid-copy (a fast disk may finish first)
            t.cmd("fill", hex(a), 256 * 256, 6 + i)
            d = tmp_path / f"d{i}"
            p = subprocess.Popen([*WPDUMP, "dump", "-t", str(t.pid), "-D", str(d), "--prev-images-dir",
                                  f"../{prev.name}", "--keep-tracking"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
            deadline = time.time() + 60
            while not [n for n in os.listdir(tmp_path) if ".wpdump-" in n] and time.time() < deadline \
                    and p.poll() is None:
                time.sleep(0.001)
            err = _interrupt(p, signal.SIGINT)
            if p.returncode != 0:
                break
            # the dump completed: start over from a fresh full pre-dump (the keeper names its directory)
            assert run("untrack", "-t", t.pid).returncode == 0
            shutil.rmtree(d)
            shutil.rmtree(prev)
            prev = tmp_path / f"p{i}"
            assert run("pre-dump", "-t", t.pid, "-D", prev).returncode == 0
        else:
            raise AssertionError("ten dumps completed before SIGINT arrived")
        assert p.returncode == 130 and "Traceback" not in err, err
        [line] = err.strip().splitlines()
        assert line.startswith(f"wpdump: interrupted (SIGINT): pid {t.pid} ") and line.endswith(f"{d} not written")
        if "not tracked" in line:  # after the harvest: tracking could not be kept, and the line says so
            assert "the next pre-dump is full" in line and keeper.tracked_pids() == []
        else:  # before it: the keeper got its tracker back
            assert f"tracked since {prev}" in line and keeper.tracked_pids() == [t.pid]
        assert ", running;" in line and running(t.pid) and not d.exists()
    finally:
        t.kill()


def test_an_ignored_hangup_stays_ignored(target, tmp_path):
    """Under nohup (SIGHUP ignored on purpose) a hangup does not end the command; Ctrl-C still does."""
    def nohup() -> None:
        default_sigint()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    p = subprocess.Popen([*WPDUMP, "checkpoint", "-t", str(target.pid), "-D", str(tmp_path / "cp"), "--interval",
                          "3600"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=nohup)
    assert p.stdout.readline().split()[:2] == ["iter", "kind"]
    assert p.stdout.readline().split()[:2] == ["1", "pre-dump"]
    p.send_signal(signal.SIGHUP)
    with open(f"/proc/{p.pid}/status") as f:
        assert any(ln.startswith("SigIgn:") and int(ln.split()[1], 16) & (1 << (signal.SIGHUP - 1)) for ln in f)
    err = _interrupt(p, signal.SIGINT)
    assert p.returncode == 130 and "interrupted (SIGINT)" in err, err
