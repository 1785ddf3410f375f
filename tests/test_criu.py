"""Real CRIU (4.x, provisioned by tools/setup) restores processes from wpdump chains via the criu-hook."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from chaincheck import PE_PARENT, PE_PRESENT, load_pagemap
from conftest import compile_target, require_kernel
from wpdump import iteration, keeper

BIN = pathlib.Path(sys.executable).parent
CRIU, CRIU4_CRIT, CRIT = BIN / "criu", BIN / "criu4-crit", BIN / "crit"
HOOK = BIN / "wpdump-criu-hook"
PAGE = 4096


@pytest.fixture(scope="module")
def selfcheck_exe(build_dir):
    if not CRIU.exists():
        pytest.fail(f"{CRIU} is missing: tools/setup provisions CRIU 4.x (tools/provision-criu)")
    return compile_target("selfcheck", build_dir)


class Workload:
    """selfcheck: writes its memory continuously, verifies it against its own checksums on SIGUSR1."""

    def __init__(self, exe, tmp: pathlib.Path, mib: int = 16) -> None:
        self.result = tmp / "result"
        self.proc = subprocess.Popen([str(exe), str(mib), str(self.result)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.proc.pid
        self.wait_line("ready")

    def lines(self) -> list[str]:
        return self.result.read_text().splitlines() if self.result.exists() else []

    def wait_line(self, prefix: str, after: int = 0, timeout: float = 10) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            new = self.lines()[after:]
            for ln in new:
                if ln.startswith(prefix) or ln.startswith("FAIL"):
                    return ln
            time.sleep(0.01)
        raise AssertionError(f"no {prefix!r} from the workload: {self.lines()}")

    def self_check(self) -> str:
        n = len(self.lines())
        os.kill(self.pid, signal.SIGUSR1)
        return self.wait_line("ok", after=n)


def criu(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([str(CRIU), *map(str, args)], capture_output=True, text=True, timeout=120)
    if check:
        assert p.returncode == 0, f"criu {' '.join(map(str, args))}: {p.returncode}\n{p.stderr}"
    return p


def gone(pid: int, timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while os.path.exists(f"/proc/{pid}") and time.time() < deadline:
        time.sleep(0.01)
    assert not os.path.exists(f"/proc/{pid}"), f"pid {pid} is still there"


def pages(d: pathlib.Path, pid: int, flag: int) -> int:
    return sum(e["nr_pages"] for e in load_pagemap(str(d), pid)[1] if e["flags"] & flag)


def decode_all(d: pathlib.Path, crits: list[pathlib.Path]) -> int:
    n = 0
    for f in sorted(d.iterdir()):
        if f.suffix != ".img" and f.name != "stats-dump" or f.name.startswith("pages-"):
            continue
        for crit in crits:
            p = subprocess.run([str(crit), "decode", "-i", str(f)], capture_output=True, text=True, timeout=60)
            assert p.returncode == 0 and p.stdout.startswith("{"), f"{crit} decode {f}: {p.stderr}"
            n += 1
    return n


def restore_and_check(final: pathlib.Path, w: Workload) -> None:
    """criu restore, then the restored process must pass its self-check and keep running."""
    w.proc.wait()  # criu dump killed it: reap it, or the restore cannot take the pid back
    gone(w.pid)
    criu("restore", "-D", final, "-d", "-o", "restore.log", "-v4")
    try:
        assert os.path.exists(f"/proc/{w.pid}")
        first = w.self_check()
        time.sleep(0.2)
        second = w.self_check()
        assert int(second.split()[1]) > int(first.split()[1]), (first, second)  # it runs on
    finally:
        os.kill(w.pid, signal.SIGKILL)


def test_criu_restores_from_the_hooked_final_dump_and_the_wpdump_chain(selfcheck_exe, tmp_path):
    require_kernel()
    w = Workload(selfcheck_exe, tmp_path)
    img = tmp_path / "img"
    img.mkdir()
    iteration.pre_dump(w.pid, str(img / "1"))
    time.sleep(0.2)
    iteration.pre_dump(w.pid, str(img / "2"), "../1")
    time.sleep(0.2)
    final = img / "final"
    final.mkdir()
    criu("dump", "-t", w.pid, "-D", final, "-o", "dump.log", "-v4", "--action-script", HOOK)
    log = (final / "dump.log").read_text()  # criu sends its action script's output to its log
    assert "wpdump criu-hook" in log and "now in the parent" in log, log[-3000:]
    assert os.readlink(final / "parent") == "../2"
    in_parent, present = pages(final, w.pid, PE_PARENT), pages(final, w.pid, PE_PRESENT)
    assert in_parent >= 4096 - 512, (in_parent, present)  # most of the 16 MiB comes from the chain
    pages_files = list(final.glob("pages-*.img"))
    size = sum(f.stat().st_size for f in pages_files)
    assert size == present * PAGE and present < 1024, (size, present)  # what changed since pre-dump 2
    assert keeper.tracked_pids() == []  # the final dump ended tracking
    # CRIU 4.x's crit and Debian's pycriu read every image wpdump wrote or rewrote
    assert decode_all(img / "1", [CRIT, CRIU4_CRIT]) >= 6
    assert decode_all(img / "2", [CRIT, CRIU4_CRIT]) >= 6
    assert decode_all(final, [CRIU4_CRIT]) >= 10
    subprocess.run([str(CRIT), "decode", "-i", str(final / f"pagemap-{w.pid}.img")], check=True, capture_output=True)
    restore_and_check(final, w)


def test_hook_fails_safe_when_tracking_was_lost(selfcheck_exe, tmp_path):
    require_kernel()
    w = Workload(selfcheck_exe, tmp_path)
    img = tmp_path / "img"
    img.mkdir()
    iteration.pre_dump(w.pid, str(img / "1"))
    [st] = iteration.status()
    os.kill(st["keeper"], signal.SIGKILL)  # tracking is lost: nothing can be vouched for
    final = img / "final"
    final.mkdir()
    criu("dump", "-t", w.pid, "-D", final, "-o", "dump.log", "-v4", "--action-script", HOOK)
    log = (final / "dump.log").read_text()
    assert "left CRIU's full images" in log and "not tracked" in log, log[-3000:]
    assert not os.path.lexists(final / "parent")
    assert pages(final, w.pid, PE_PARENT) == 0 and pages(final, w.pid, PE_PRESENT) >= 4096
    restore_and_check(final, w)


def test_hook_ignores_other_actions_and_missing_env():
    for env in ({"CRTOOLS_SCRIPT_ACTION": "pre-dump"}, {"CRTOOLS_SCRIPT_ACTION": "post-dump"}):
        p = subprocess.run([str(HOOK)], env={**os.environ, **env}, capture_output=True, text=True)
        assert p.returncode == 0
