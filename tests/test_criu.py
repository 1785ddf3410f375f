"""Real CRIU (4.x, provisioned by tools/setup) restores processes from wpdump chains via the criu-hook."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from chaincheck import PE_PARENT, PE_PRESENT, compare_with_memory, load_pagemap, maps
from conftest import ResultLines, Target, compile_target, copied_pages, page_set, require_kernel, zero_pages
from wpdump import ranges
from wpdump.dump import iteration
from wpdump.target import uffd
from wpdump.tracking import keeper
from wpdump.tracking.tracker import Tracker

BIN = pathlib.Path(sys.executable).parent
CRIU, CRIU4_CRIT, CRIT = BIN / "criu", BIN / "criu4-crit", BIN / "crit"
HOOK = BIN / "wpdump-criu-hook"
PAGE = 4096


@pytest.fixture(scope="module")
def selfcheck_exe(build_dir):
    if not CRIU.exists():
        pytest.fail(f"{CRIU} is missing: tools/setup provisions CRIU 4.x (tools/provision-criu)")
    return compile_target("selfcheck", build_dir)


class Workload(ResultLines):
    """selfcheck: writes its memory continuously, verifies it against its own checksums on SIGUSR1."""

    wait_timeout = 10.0

    def __init__(self, exe, tmp: pathlib.Path, mib: int = 16, reserve_mib: int = 0, memfd_pages: int = 0,
                 env: dict | None = None) -> None:
        self.result = tmp / "result"
        args = [str(exe), str(mib), str(self.result), "4", str(reserve_mib), str(memfd_pages)]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.proc.pid
        self.wait_line("ready")



    def self_check(self) -> str:
        n = len(self.lines())
        os.kill(self.pid, signal.SIGUSR1)
        return self.wait_line("ok", after=n)


@pytest.fixture
def workload(selfcheck_exe, tmp_path):
    """Start selfcheck workloads; one still running at the end (a failed dump left it) is killed."""
    made: list[Workload] = []

    def start(**kw) -> Workload:
        made.append(Workload(selfcheck_exe, tmp_path, **kw))
        return made[-1]

    yield start
    for w in made:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()


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


def assert_no_standby(images_dir: pathlib.Path, pid: int, timeout: float = 10) -> None:
    """The criu-hook standby of this dump (its abstract unix socket) does not outlive the dump."""
    from wpdump.dump.hook_entry import socket_name

    name = "@" + socket_name(os.path.realpath(images_dir), pid)[1:].decode()
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open("/proc/net/unix") as f:
            if not any(line.split()[-1] == name for line in f.read().splitlines()[1:] if len(line.split()) > 7):
                return
        time.sleep(0.01)
    raise AssertionError(f"the criu-hook standby {name} is still listening")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))


def restore_and_check(final: pathlib.Path, w: Workload) -> int:
    """criu restore, then the restored process must pass its self-check and keep running; returns its
    RSS (KiB) right after the restore."""
    w.proc.wait()  # criu dump killed it: reap it, or the restore cannot take the pid back
    gone(w.pid)
    criu("restore", "-D", final, "-d", "-o", "restore.log", "-v4")
    try:
        assert os.path.exists(f"/proc/{w.pid}")
        rss = rss_kib(w.pid)
        first = w.self_check()
        time.sleep(0.2)
        second = w.self_check()
        assert int(second.split()[1]) > int(first.split()[1]), (first, second)  # it runs on
    finally:
        os.kill(w.pid, signal.SIGKILL)
    return rss


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
    # the post-dump work was done by the standby the pre-dump step left (no start-up in the frozen window),
    # which is gone with the dump
    assert "post-dump done by the standby" in log, log[-3000:]
    assert_no_standby(final, w.pid)
    assert os.readlink(final / "parent") == "../2"
    in_parent, present = pages(final, w.pid, PE_PARENT), pages(final, w.pid, PE_PRESENT)
    assert in_parent >= 4096 - 512, (in_parent, present)  # most of the 16 MiB comes from the chain
    pages_files = list(final.glob("pages-*.img"))
    size = sum(f.stat().st_size for f in pages_files)
    assert size == present * PAGE and present < 1024, (size, present)  # what changed since pre-dump 2
    # CRIU's own pages file, moved aside in the frozen window, is removed by a process of its own afterwards
    deadline = time.time() + 60
    while list(final.glob(".wpdump-unlink-*")) and time.time() < deadline:
        time.sleep(0.01)
    assert not list(final.glob(".wpdump-unlink-*")) and len(pages_files) == 1, list(final.iterdir())
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
    assert_no_standby(final, w.pid)
    assert not os.path.lexists(final / "parent")
    assert pages(final, w.pid, PE_PARENT) == 0 and pages(final, w.pid, PE_PRESENT) >= 4096
    restore_and_check(final, w)


def test_hook_ignores_other_actions_and_missing_env(tmp_path):
    for env in ({"CRTOOLS_SCRIPT_ACTION": "pre-dump"}, {"CRTOOLS_SCRIPT_ACTION": "post-dump"},
                {"CRTOOLS_SCRIPT_ACTION": "network-lock"}):
        p = subprocess.run([str(HOOK)], env={**os.environ, **env}, capture_output=True, text=True)
        assert p.returncode == 0
    # pre-dump of a pid wpdump does not track: nothing to do, nothing said
    env = {"CRTOOLS_SCRIPT_ACTION": "pre-dump", "CRTOOLS_IMAGE_DIR": str(tmp_path),
           "CRTOOLS_INIT_PID": str(os.getpid())}
    p = subprocess.run([str(HOOK)], env={**os.environ, **env}, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout == p.stderr == "", p


def test_hook_program_runs_the_python_hook_beside_it_or_on_path(tmp_path):
    """The wpdump-criu-hook program hands pre-dump, and a post-dump it cannot ask a standby about, to
    wpdump-criu-hook-py: the one beside it, else the one on PATH; with none it says so and exits 0."""
    lone = tmp_path / "wpdump-criu-hook"
    lone.write_bytes(HOOK.read_bytes())
    lone.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRTOOLS_")}
    env["CRTOOLS_SCRIPT_ACTION"] = "post-dump"  # no images dir: nothing to ask, the Python hook says why
    for exe, path in ((HOOK, "/usr/bin:/bin"), (lone, f"{BIN}:/usr/bin:/bin")):
        p = subprocess.run([str(exe)], env={**env, "PATH": path}, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and "no CRTOOLS_IMAGE_DIR" in p.stderr, (exe, p)
    p = subprocess.run([str(lone)], env={**env, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "cannot run wpdump-criu-hook-py" in p.stderr, p


def test_hooked_dump_without_a_standby_is_done_by_the_python_hook(selfcheck_exe, tmp_path):
    """No standby to ask at post-dump (the pre-dump step ran without one): the wpdump-criu-hook program runs the
    Python hook, which does the rewrite itself; criu restore brings the process back whole."""
    require_kernel()
    w = Workload(selfcheck_exe, tmp_path)
    img = tmp_path / "img"
    img.mkdir()
    iteration.pre_dump(w.pid, str(img / "1"))
    time.sleep(0.2)
    script = tmp_path / "action"
    script.write_text(f"""#!/bin/sh
[ "$CRTOOLS_SCRIPT_ACTION" = pre-dump ] && exec {BIN / "wpdump"} criu-hook
exec {HOOK}
""")
    script.chmod(0o755)
    final = img / "final"
    final.mkdir()
    criu("dump", "-t", w.pid, "-D", final, "-o", "dump.log", "-v4", "--action-script", script)
    log = (final / "dump.log").read_text()
    assert "removed write-protect markers" in log and "now in the parent" in log, log[-3000:]
    assert "done by the standby" not in log, log[-3000:]
    assert pages(final, w.pid, PE_PARENT) >= 4096 - 512
    restore_and_check(final, w)


def hooked_dump_of_rewritten_pages(workload, tmp_path: pathlib.Path, action: pathlib.Path) -> str:
    """selfcheck paused, pre-dumped, three quarters of its 16 MiB rewritten through /proc/PID/mem, then criu dump
    --leave-stopped with ``action``: the final dump must equal the process byte for byte, and so must the process
    criu restore brings back from it. Returns CRIU's log."""
    require_kernel()
    # without rseq: the kernel rewrites a registered rseq area's cpu_id when the process runs on another CPU
    w = workload(mib=16, env={**os.environ, "GLIBC_TUNABLES": "glibc.pthread.rseq=0"})
    os.kill(w.pid, signal.SIGUSR2)  # selfcheck stops writing: the test writes instead
    w.wait_line("paused")
    img = tmp_path / "img"
    img.mkdir()
    iteration.pre_dump(w.pid, str(img / "1"))
    lo, hi = next((lo, hi) for lo, hi, perms, _, inode, path in maps(w.pid)
                  if hi - lo == 16 << 20 and inode == 0 and not path and perms.startswith("rw"))
    rng = np.random.default_rng(15)
    pick = np.sort(rng.choice((hi - lo) // PAGE, (hi - lo) // PAGE * 3 // 4, replace=False))
    with open(f"/proc/{w.pid}/mem", "r+b", buffering=0) as mem:
        for i in pick.tolist():  # written through /proc/PID/mem: the tracker sees it (docs/kernel.md rule 9)
            mem.seek(lo + i * PAGE)
            mem.write(rng.bytes(PAGE))
    final = img / "final"
    final.mkdir()
    criu("dump", "-t", w.pid, "-D", final, "-o", "dump.log", "-v4", "--leave-stopped", "--action-script", action)
    log = (final / "dump.log").read_text()
    try:
        assert "now in the parent" in log and "done by the standby" in log, log[-3000:]
        assert pages(final, w.pid, PE_PRESENT) >= len(pick) and pages(final, w.pid, PE_PARENT) >= 512, log[-3000:]
        compare_with_memory(str(final), w.pid)  # CRIU left the process stopped as it dumped it
    finally:
        os.kill(w.pid, signal.SIGKILL)
    w.proc.wait()
    gone(w.pid)
    criu("restore", "-D", final, "-d", "--leave-stopped", "-o", "restore.log", "-v4")
    try:
        compare_with_memory(str(final), w.pid)
    finally:
        os.kill(w.pid, signal.SIGKILL)
    return log


def test_hooked_dump_after_most_pages_were_rewritten(workload, tmp_path):
    """Three quarters of the pages rewritten since the last pre-dump: few of the sample pages read from the chain
    before the freeze are still in the parent, so the sample is topped up from the chain in the frozen window,
    and the 12 MiB kept go through several gathered batches."""
    hooked_dump_of_rewritten_pages(workload, tmp_path, HOOK)


def test_hooked_dump_reads_what_the_page_cache_lost_from_the_frozen_process(workload, tmp_path):
    """CRIU's pages file dropped from the page cache before post-dump (as a dump of several GiB partly is): the kept
    pages and the sample are read from the frozen process instead of the disk, and the result is the same."""
    action = tmp_path / "action"
    action.write_text(f"""#!/bin/sh
if [ "$CRTOOLS_SCRIPT_ACTION" = post-dump ]; then
    {sys.executable} -c '
import glob, os
for p in glob.glob(os.path.join(os.environ["CRTOOLS_IMAGE_DIR"], "pages-*.img")):
    fd = os.open(p, os.O_RDONLY)
    os.fdatasync(fd)  # written back, then dropped
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)'
fi
exec {HOOK}
""")
    action.chmod(0o755)
    log = hooked_dump_of_rewritten_pages(workload, tmp_path, action)
    assert "read from memory" in log, log[-3000:]


def test_hook_refuses_a_chain_whose_pages_differ_from_criu_dump(selfcheck_exe, tmp_path):
    """The chain's pages file was overwritten after the pre-dump: the sample read from the chain before the freeze
    differs from CRIU's pages, so the hook leaves CRIU's full images as they are (restored whole)."""
    require_kernel()
    w = Workload(selfcheck_exe, tmp_path)
    img = tmp_path / "img"
    img.mkdir()
    iteration.pre_dump(w.pid, str(img / "1"))
    for f in (img / "1").glob("pages-*.img"):
        f.write_bytes(bytes([0xA5]) * f.stat().st_size)
    final = img / "final"
    final.mkdir()
    criu("dump", "-t", w.pid, "-D", final, "-o", "dump.log", "-v4", "--action-script", HOOK)
    log = (final / "dump.log").read_text()
    assert "differs from CRIU's dump" in log and "left CRIU's full images" in log, log[-3000:]
    assert not os.path.lexists(final / "parent")
    assert pages(final, w.pid, PE_PARENT) == 0 and pages(final, w.pid, PE_PRESENT) >= 4096
    restore_and_check(final, w)


def pages_bytes(d: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in d.glob("pages-*.img"))


def test_hooked_dump_of_an_untouched_reservation_is_as_small_as_an_untracked_one(workload, tmp_path):
    """docs/kernel.md rule 17: CRIU read every write-protect marker of a tracked process as a swapped page
    and dumped a never-touched reservation whole as zeros; restored, the process held all of it."""
    require_kernel()
    reserve_mib = 64
    w = workload(mib=1, reserve_mib=reserve_mib)
    untracked = tmp_path / "untracked"
    untracked.mkdir()
    criu("dump", "-t", w.pid, "-D", untracked, "-o", "dump.log", "-v4", "--leave-running")
    plain = pages(untracked, w.pid, PE_PRESENT)
    assert pages_bytes(untracked) == plain * PAGE and plain < reserve_mib * 256 // 4, plain
    img = tmp_path / "img"
    img.mkdir()
    iteration.pre_dump(w.pid, str(img / "1"))
    time.sleep(0.2)
    final = img / "final"
    final.mkdir()
    criu("dump", "-t", w.pid, "-D", final, "-o", "dump.log", "-v4", "--action-script", HOOK)
    hooked = pages(final, w.pid, PE_PRESENT) + pages(final, w.pid, PE_PARENT)  # all CRIU collected
    assert hooked <= 2 * plain, (hooked, plain)
    assert pages_bytes(final) <= plain * PAGE, (pages_bytes(final), plain)
    log = (final / "dump.log").read_text()
    assert "removed write-protect markers" in log and "now in the parent" in log, log[-3000:]
    rss = restore_and_check(final, w)  # the self-check also reads the reservation: all zero
    assert rss < reserve_mib * 1024 // 4, rss


def test_hooked_dump_of_a_private_memfd_mapping_longer_than_its_file(workload, tmp_path):
    """A marker past the end of a privately mapped memfd made CRIU's dump fail ("Can't splice all pages
    to pipe"): it tried to read the page as a swapped one."""
    require_kernel()
    w = workload(mib=1, memfd_pages=8)
    img = tmp_path / "img"
    img.mkdir()
    iteration.pre_dump(w.pid, str(img / "1"))
    time.sleep(0.2)
    final = img / "final"
    final.mkdir()
    criu("dump", "-t", w.pid, "-D", final, "-o", "dump.log", "-v4", "--action-script", HOOK)
    log = (final / "dump.log").read_text()
    assert "removed write-protect markers" in log and "now in the parent" in log, log[-3000:]
    restore_and_check(final, w)  # the self-check compares the memfd mapping with what was written


PM_SWAP, PM_UFFD_WP = 1 << 62, 1 << 57


def pagemap(pid: int, addr: int, n: int) -> np.ndarray:
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as f:
        return np.frombuffer(os.pread(f.fileno(), n * 8, addr // PAGE * 8), dtype=np.uint64)


def markers(pid: int, addr: int, n: int) -> list[int]:
    """Indices of the pages in [addr, addr + n pages) that hold a uffd-wp pte marker (swap type 31)."""
    e = pagemap(pid, addr, n)
    return np.flatnonzero(((e & np.uint64(PM_SWAP)) != 0) & ((e & np.uint64(31)) == 31)).tolist()


def test_unmark_empty_removes_only_markers_and_loses_no_write(memtarget_exe, tmp_path):
    """Tracker.unmark_empty: markers go from empty pages only, the dirty set is kept, a page written after
    it is reported, an empty page is reported zero (anonymous) or file content (private file mapping)."""
    require_kernel()
    t = Target(memtarget_exe)
    try:
        anon = t.map(64)
        t.cmd("fill", f"{anon:x}", 8, 1)
        f = tmp_path / "file"
        f.write_bytes(bytes(range(256)) * (64 * PAGE // 256))
        fm = t.addr("mapfile", f, 64, "private")
        t.cmd("poke", f"{fm:x}", "0")  # COWed
        t.cmd("read", f"{fm:x}", 4)  # the file's own pages (fault-around maps some more), present
        # the upper half without a PTE whatever fault-around mapped: it maps a whole large folio of the page cache,
        # which ext4 may give a 256 KiB file (0 pages without a PTE, seen once in a full run)
        t.cmd("madvise", f"{fm + 32 * PAGE:x}", 32, "dontneed")
        t.wait_idle()
        with Tracker(t.pid) as tr:
            t.cmd("poke", f"{anon:x}", "2")  # written before: the dirty set must keep it
            t.wait_idle()
            assert markers(t.pid, anon, 64) == list(range(8, 64))
            fmark = markers(t.pid, fm, 64)  # the file pages without a PTE
            assert len(fmark) >= 32 and 0 not in fmark, fmark
            n = tr.unmark_empty()
            assert n >= (56 + len(fmark)) * PAGE, n
            assert markers(t.pid, anon, 64) == [] and markers(t.pid, fm, 64) == []
            e = pagemap(t.pid, anon, 8)  # present pages keep their protection
            assert (((e & np.uint64(PM_UFFD_WP)) != 0) == (np.arange(8) != 2)).all(), e
            t.cmd("poke", f"{anon:x}", "10,20")
            t.cmd("poke", f"{fm:x}", fmark[-1])
            t.wait_idle()
            h = tr.harvest()
            lo, hi = anon, anon + 64 * PAGE
            assert copied_pages(h, lo, hi) == {anon + i * PAGE for i in (2, 10, 20)}
            assert zero_pages(h, lo, hi) == {anon + i * PAGE for i in range(8, 64) if i not in (10, 20)}
            [vp] = [v for v in h.vmas if v.vma.start == fm]
            assert page_set(vp.copy) == {fm + fmark[-1] * PAGE}
            assert page_set(vp.reverted) == {fm + i * PAGE for i in fmark[:-1]}
            assert tr.unmark_empty() >= (54 + len(fmark) - 1) * PAGE  # the harvest put markers back (rule 17)
    finally:
        t.kill()


def test_unmark_empty_racing_writers_lose_no_update(target):
    """Writers race with zapping, harvests and unmark_empty: an image kept from the harvests alone (copy:
    read after the harvest, zero: zero) equals the memory at the end (model: test_no_lost_update).
    The writers write the lower half; the upper half stays empty, its markers go every round."""
    pages, chunk, rounds = 1024, 128, 100
    a = target.map(pages)
    with Tracker(target.pid) as tr:
        model = np.zeros((pages, PAGE), dtype=np.uint8)  # the attach-time image: all zero
        target.cmd("threads", 4, hex(a), pages // 2)
        unmarked = 0
        for i in range(rounds + 1):
            if i == rounds:
                target.cmd("stopthreads")
            else:  # empty pages again: the harvest below puts markers on them, unmark_empty takes them off
                target.cmd("madvise", hex(a + (i % (pages // chunk)) * chunk * PAGE), chunk, "dontneed")
            h = tr.harvest()
            for s, e in ranges.clip(h.zero_ranges(), a, a + pages * PAGE).tolist():
                model[(s - a) // PAGE:(e - a) // PAGE] = 0
            for s, e in ranges.clip(h.copy_ranges(), a, a + pages * PAGE).tolist():
                rows = model[(s - a) // PAGE:(e - a) // PAGE]
                assert uffd.read_ranges(target.pid, ranges.from_pairs([(s, e)]), rows) == e - s
            if i < rounds:
                unmarked += tr.unmark_empty()
        final = np.empty((pages, PAGE), dtype=np.uint8)
        assert uffd.read_ranges(target.pid, ranges.from_pairs([(a, a + pages * PAGE)]), final) == final.size
    assert unmarked >= rounds * pages // 2 * PAGE, unmarked
    bad = np.flatnonzero((model != final).any(axis=1))
    assert not len(bad), f"{len(bad)} pages differ, first at {a + int(bad[0]) * PAGE:#x}"
