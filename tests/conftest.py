"""Fixtures: C target programs compiled at test time and driven over a pipe."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import time
from typing import NoReturn

import numpy as np
import pytest
from wpdump import ranges
from wpdump.target import uffd

TARGETS = pathlib.Path(__file__).parent / "targets"
PAGE = ranges.PAGE


def unavailable(reason: str) -> NoReturn:
    """Skip a test where this machine lacks what it needs (``reason`` names it); in CI, where nothing may be
    lacking, fail instead."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: CI machines must have it")
    pytest.skip(reason)


def require_kernel() -> None:
    """Skip (naming the feature) only where the kernel truly lacks it; in CI a lack is a failure."""
    try:
        missing = uffd.missing_features()
    except Exception as e:  # noqa: BLE001 - no userfaultfd at all
        missing = [f"userfaultfd ({e})"]
    if missing:
        unavailable(f"kernel lacks {missing[0]}")


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("targets")


def compile_target(name: str, out_dir: pathlib.Path) -> pathlib.Path:
    """Compile tests/targets/NAME.c into out_dir."""
    exe = out_dir / name
    if not exe.exists():
        subprocess.run(
            ["gcc", "-O1", "-g", "-pthread", "-Wall", "-o", str(exe), str(TARGETS / f"{name}.c")],
            check=True,
        )
    return exe


def default_sigint() -> None:
    """preexec_fn for a command the test interrupts: a shell script's background job (`cmd &`) inherits SIGINT
    ignored, and a process that inherits it ignored (Python, wpdump) rightly keeps it so."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_idle(pid: int) -> None:
    """Wait until a memtarget blocks in read(0, ...) for its next command: after its reply it still
    runs (returning, calling fgets) and writes its stack; an image compared while it runs differs."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/syscall") as f:
            if f.read().split()[:2] == ["0", "0x0"]:
                return
        time.sleep(0.0005)
    raise AssertionError(f"target {pid} never went idle")


class ResultLines:
    """A self-checking workload's result file (``self.result``: lines it appends, e.g. "ok TICKS", "FAIL ...")."""

    result: pathlib.Path
    wait_timeout = 30.0

    def lines(self) -> list[str]:
        return self.result.read_text().splitlines() if self.result.exists() else []

    def wait_line(self, prefix: str, after: int = 0, timeout: float | None = None) -> str:
        """The first line after line ``after`` starting with ``prefix`` (or FAIL, which the caller checks)."""
        deadline = time.time() + (timeout or self.wait_timeout)
        while time.time() < deadline:
            for ln in self.lines()[after:]:
                if ln.startswith(prefix) or ln.startswith("FAIL"):
                    return ln
            time.sleep(0.01)
        raise AssertionError(f"no {prefix!r} from the workload: {self.lines()[-5:]}")


class Target:
    """A running memtarget: send a command, get the reply fields."""

    def __init__(self, exe: pathlib.Path, *, user: int | None = None) -> None:
        self.proc = subprocess.Popen(
            [str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            user=user, group=user, extra_groups=None if user is None else [],  # all ids: ptrace checks the gids too
        )
        first = self.proc.stdout.readline().split()
        assert first[0] == "ready", first
        self.pid = int(first[1])

    def cmd(self, *words: object) -> list[str]:
        self.proc.stdin.write(" ".join(str(w) for w in words) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().split()
        assert reply and reply[0] == "ok", f"{words} -> {reply}"
        return reply[1:]

    def addr(self, *words: object) -> int:
        return int(self.cmd(*words)[0], 16)

    def map(self, pages: int, kind: str = "private") -> int:
        return self.addr("map", pages, kind)

    def wait_idle(self) -> None:
        wait_idle(self.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def read_mem(self, start: int, length: int) -> bytes:
        with open(f"/proc/{self.pid}/mem", "rb", buffering=0) as f:
            return os.pread(f.fileno(), length, start)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def smaps_flags(self, start: int) -> set[str]:
        cur = None
        with open(f"/proc/{self.pid}/smaps") as f:
            for line in f:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):
                    cur = int(head.split("-")[0], 16)
                elif line.startswith("VmFlags:") and cur == start:
                    return set(line.split()[1:])
        raise AssertionError(f"no VMA at {start:#x}")


@pytest.fixture(scope="session")
def memtarget_exe(build_dir: pathlib.Path) -> pathlib.Path:
    return compile_target("memtarget", build_dir)


@pytest.fixture
def target(memtarget_exe: pathlib.Path):
    require_kernel()
    t = Target(memtarget_exe)
    yield t
    t.kill()


def page_set(r: np.ndarray) -> set[int]:
    """The page addresses covered by n×2 ranges."""
    out: set[int] = set()
    for a, b in r:
        out.update(range(int(a), int(b), PAGE))
    return out


def copied_pages(h, lo: int, hi: int) -> set[int]:
    """Pages of [lo, hi) that harvest ``h`` says to copy."""
    return {p for p in page_set(h.copy_ranges()) if lo <= p < hi}


def zero_pages(h, lo: int, hi: int) -> set[int]:
    return {p for p in page_set(h.zero_ranges()) if lo <= p < hi}



@pytest.fixture(autouse=True)
def run_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Each test gets its own keeper directory (0700: wpdump refuses one others may write); keepers still
    running at the end are stopped."""
    d = tmp_path_factory.mktemp("run")
    d.chmod(0o700)
    monkeypatch.setenv("WPDUMP_RUN_DIR", str(d))
    yield d
    from wpdump.tracking import keeper

    for pid in keeper.tracked_pids():
        k = keeper.Keeper.connect(pid)
        if k is not None:
            try:
                k.untrack()
            except keeper.KeeperError:
                pass
            k.close()
