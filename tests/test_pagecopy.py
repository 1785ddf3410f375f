"""Reading pages out of the target (memory.Reader) leaves it as it was and leaves nothing out: pages of VMAs
without read permission are dumped, pages shared copy-on-write with a forked process stay shared (same PFN
in both), and a page that cannot be read fails loudly instead of missing from the image."""

from __future__ import annotations

import os
import signal
import struct
import time

import numpy as np
import pytest
from chaincheck import PE_PRESENT, compare_with_memory, load_pagemap
from conftest import unavailable
from wpdump import ranges
from wpdump.chainops import verify
from wpdump.dump import iteration, pages
from wpdump.errors import UnreadableMemory
from wpdump.target import memory, uffd

PAGE = 4096
PFN_MASK = (1 << 55) - 1


def pfns(pid: int, addr: int, pages: int) -> np.ndarray:
    """The PFN of each page from /proc/PID/pagemap (0 where not present); root sees real PFNs."""
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        raw = os.pread(f.fileno(), pages * 8, addr // PAGE * 8)
    ent = np.array(struct.unpack(f"{pages}Q", raw), dtype=np.uint64)
    present = (ent >> np.uint64(63)) & np.uint64(1)
    return np.where(present == 1, ent & np.uint64(PFN_MASK), np.uint64(0))


def present_pages(d, pid: int) -> set[int]:
    _, entries = load_pagemap(str(d), pid)
    return {p for e in entries if e["flags"] & PE_PRESENT
            for p in range(e["vaddr"], e["vaddr"] + e["nr_pages"] * PAGE, PAGE)}


def fork(t, addr: int, writes: int, children: list[int]) -> int:
    """memtarget's fork: the child writes ``writes`` pages at ``addr``, then pauses; wait until it does."""
    child = int(t.cmd("fork", hex(addr), writes)[0])
    children.append(child)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with open(f"/proc/{child}/syscall") as f:
            if f.read().split()[0] == "34":  # pause(): its writes are done
                return child
        time.sleep(0.001)
    raise AssertionError(f"child {child} never paused")


@pytest.fixture
def children():
    """Pids of forked target children to kill at the end (they pause forever)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("prot", ["w", "none", "x"])
def test_pages_of_unreadable_vmas_are_dumped(target, tmp_path, prot):
    """Write A, pre-dump, make the VMA write-only / PROT_NONE / exec-only and write B: every iteration holds B."""
    t = target
    n = 1024  # 4 MiB
    a = t.map(n)
    t.cmd("fill", hex(a), n, 1)
    iteration.pre_dump(t.pid, str(tmp_path / "1"))
    t.cmd("mprotect", hex(a), n, prot)
    if prot != "w":  # the target cannot write there itself: make it writable for the write, then back
        t.cmd("mprotect", hex(a), n, "rw")
    t.cmd("fill", hex(a), n, 2)
    if prot != "w":
        t.cmd("mprotect", hex(a), n, prot)
    r2 = iteration.pre_dump(t.pid, str(tmp_path / "2"), "../1")
    assert r2.incremental
    want = {a + i * PAGE for i in range(n)}
    assert want <= present_pages(tmp_path / "2", t.pid), "pages written under the new protection were left out"
    t.wait_idle()
    r3 = iteration.dump(t.pid, str(tmp_path / "3"), "../2", leave_stopped=True)
    try:
        assert r3.incremental and not r3.warnings
        assert compare_with_memory(str(tmp_path / "3"), t.pid) >= n
        res = verify.verify_process(t.pid, str(tmp_path / "3"))
        assert res.ok and res.pages_unreadable == 0, res.summary()
    finally:
        os.kill(t.pid, signal.SIGCONT)


def test_reader_reads_unreadable_vmas_and_skips_only_what_vanished(target):
    """One read over [rw][PROT_NONE][write-only][unmapped][guard][exec-only]: the holes alone are lost."""
    t = target
    a = t.map(60)
    t.cmd("fill", hex(a), 60, 3)
    t.cmd("mprotect", hex(a + 10 * PAGE), 10, "none")
    t.cmd("mprotect", hex(a + 20 * PAGE), 10, "w")
    t.cmd("munmap", hex(a + 30 * PAGE), 5)
    t.cmd("madvise", hex(a + 40 * PAGE), 1, "guard")
    t.cmd("mprotect", hex(a + 50 * PAGE), 10, "x")
    r = ranges.from_pairs([(a, a + 60 * PAGE)])
    for unreadable in (ranges.EMPTY, ranges.from_pairs([(a + 10 * PAGE, a + 30 * PAGE)])):
        out = np.zeros(60 * PAGE, dtype=np.uint8)
        with memory.Reader(t.pid, unreadable) as reader:
            ok = reader.read_into(r, out)
        lost = set(range(30, 35)) | {40}
        assert ok is not None and set(np.flatnonzero(~ok).tolist()) == lost
        for i in sorted(set(range(60)) - lost):
            assert out[i * PAGE : (i + 1) * PAGE].tobytes() == t.read_mem(a + i * PAGE, PAGE), f"page {i}"


def test_unreadable_mapped_pages_fail_loudly(target, tmp_path):
    """memfd_secret pages are mapped but no reader can read them: an error naming the range, not a gap."""
    t = target
    t.proc.stdin.write("secret 4\n")
    t.proc.stdin.flush()
    reply = t.proc.stdout.readline().split()
    if reply[0] != "ok":
        if reply[1:] == ["38"]:  # ENOSYS: CONFIG_SECRETMEM off, or secretmem.enable=0
            unavailable("kernel lacks memfd_secret")
        raise AssertionError(reply)
    s = int(reply[1], 16)
    b = t.map(8)
    t.cmd("fill", hex(b), 8, 4)
    r = ranges.merge(ranges.from_pairs([(b, b + 8 * PAGE), (s + PAGE, s + 3 * PAGE)]))
    with memory.Reader(t.pid) as reader, pytest.raises(UnreadableMemory) as e:
        reader.read_into(r, np.zeros(ranges.total(r), dtype=np.uint8))
    assert (e.value.start, e.value.end, e.value.pid) == (s + PAGE, s + 3 * PAGE, t.pid)
    assert f"{s + PAGE:#x}-{s + 3 * PAGE:#x}" in str(e.value)
    fd = os.open(tmp_path / "pages", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(UnreadableMemory):
            pages.copy_and_write(t.pid, r, ranges.EMPTY, fd, "pages", None)
    finally:
        os.close(fd)


def test_reads_leave_copy_on_write_sharing_as_it_was(target, tmp_path, children):
    """Pages shared with forked children keep their PFN in the target through a full pre-dump (pages shared
    since the start), an incremental one (pages written, then shared by a fork) and the final dump."""
    t = target
    n = 2048
    a = t.map(n)
    t.cmd("fill", hex(a), n, 5)
    fork(t, a, n // 4, children)  # the child writes a quarter: the rest stays shared
    b = t.map(n)
    other = t.map(16)
    before_a = pfns(t.pid, a, n)
    assert before_a.all(), "PFNs not visible (needs CAP_SYS_ADMIN)"
    shared_a = pfns(children[0], a, n) == before_a
    assert int(shared_a.sum()) == n - n // 4

    iteration.pre_dump(t.pid, str(tmp_path / "1"))
    assert np.array_equal(pfns(t.pid, a, n), before_a), "the full pre-dump un-shared pages"

    t.cmd("fill", hex(b), n, 6)  # dirty since the last pre-dump, then shared by a second fork
    fork(t, b, 0, children)
    t.cmd("fill", hex(other), 16, 7)
    before_b = pfns(t.pid, b, n)
    assert np.array_equal(pfns(children[1], b, n), before_b)
    r2 = iteration.pre_dump(t.pid, str(tmp_path / "2"), "../1")
    assert r2.incremental and {b + i * PAGE for i in range(n)} <= present_pages(tmp_path / "2", t.pid)
    assert np.array_equal(pfns(t.pid, b, n), before_b), "the incremental pre-dump un-shared pages"

    t.cmd("fill", hex(b), 4, 8)  # the target's own writes copy these four (copy-on-write), no others
    t.wait_idle()
    r3 = iteration.dump(t.pid, str(tmp_path / "3"), "../2", leave_stopped=True)
    try:
        assert r3.incremental
        now_a, now_b = pfns(t.pid, a, n), pfns(t.pid, b, n)
        assert np.array_equal(now_a, before_a)
        assert np.array_equal(now_b[4:], before_b[4:])
        assert np.array_equal(pfns(children[0], a, n) == now_a, shared_a)
        assert int((pfns(children[1], b, n) == now_b).sum()) == n - 4
        compare_with_memory(str(tmp_path / "3"), t.pid)
    finally:
        os.kill(t.pid, signal.SIGCONT)


def test_pagemap_match_agrees_with_pagemap_page_by_page(target, children):
    """uffd.pagemap_match (the Reader's native test of which pages a pin may read) gives, page by page, what the
    target's /proc/PID/pagemap entries say: present pages mapped alone, not pages shared with a forked child nor
    pages never touched; ranges near each other (read by one pread) or far apart, touching or not."""
    t = target
    n = 4096
    a = t.map(n)
    def poke(pages: range) -> None:
        for i in range(0, len(pages), 64):  # the target reads lines of limited length
            t.cmd("poke", hex(a), ",".join(str(p) for p in pages[i : i + 64]))

    poke(range(0, n, 3))  # every third page present
    fork(t, a, n // 8, children)  # pages the child does not write stay shared (not exclusive in the target)
    poke(range(n // 2, n, 5))  # copied again: exclusive
    with open(f"/proc/{t.pid}/pagemap", "rb") as f:
        raw = os.pread(f.fileno(), n * 8, a // PAGE * 8)
    ent = np.array(struct.unpack(f"{n}Q", raw), dtype=np.uint64)
    present = ((ent >> np.uint64(63)) & np.uint64(1)).astype(bool)
    alone = (((ent >> np.uint64(56)) & np.uint64(1)) | ((ent >> np.uint64(61)) & np.uint64(1))).astype(bool)
    want = present & alone
    assert want.any() and (present & ~alone).any() and not present[1], "expected pages of every kind"
    rng = np.random.default_rng(15)
    fd = os.open(f"/proc/{t.pid}/pagemap", os.O_RDONLY)
    try:
        for density in (0.002, 0.05, 0.5, 1.0):
            sel = np.flatnonzero(rng.random(n) < density) if density < 1 else np.arange(n)
            r = ranges.from_pages(np.uint64(a) + sel.astype(np.uint64) * np.uint64(PAGE))
            for rr in (r, np.concatenate(ranges.batches(r, 2 * PAGE))):  # whole runs, and runs cut in touching pieces
                got = uffd.pagemap_match(fd, rr, memory.COVER_GAP, int(memory.PM_PRESENT),
                                         int(memory.PM_EXCLUSIVE | memory.PM_FILE))
                assert got is not None and np.array_equal(got, want[sel])
    finally:
        os.close(fd)
