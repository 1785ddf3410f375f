"""The command line (`wpdump demo`, `wpdump track`) and the benchmark script, run end to end."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from conftest import require_kernel

ROOT = pathlib.Path(__file__).resolve().parent.parent
WPDUMP = [sys.executable, "-m", "wpdump.cli"]


def run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def unused_pid() -> int:
    limit = int(pathlib.Path("/proc/sys/kernel/pid_max").read_text())
    pid = limit - 1
    while os.path.exists(f"/proc/{pid}"):
        pid -= 1
    return pid


def test_demo_verifies_identical():
    require_kernel()
    r = run([*WPDUMP, "demo", "--mib", "16", "--rounds", "3"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "identical" in r.stdout
    assert "verified" in r.stdout


def test_track_no_such_process():
    r = run([*WPDUMP, "track", "-t", str(unused_pid()), "--rounds", "1"])
    assert r.returncode != 0
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("wpdump: no such process"), r.stderr
    assert "Traceback" not in r.stderr


def test_track_rounds(tmp_path):
    require_kernel()
    from wpdump.workloads import build

    proc = subprocess.Popen([str(build("demo")), "8"], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(proc.stdout.readline().split()[1])
        r = run([*WPDUMP, "track", "-t", str(pid), "--rounds", "2", "--interval", "0.2", "--json"])
        assert r.returncode == 0, r.stderr
        assert len(r.stdout.splitlines()) == 3  # the attach round, then 2
        assert proc.poll() is None  # the target runs on
    finally:
        proc.kill()
        proc.wait()


def test_bench_smoke(tmp_path):
    require_kernel()
    out = tmp_path / "bench.json"
    r = run([sys.executable, "tools/bench_tracker", "--mib", "16", "--rounds", "2", "--json", str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "target paused (baseline)" in r.stdout
    assert "first write, protected" in r.stdout
    assert out.exists()
