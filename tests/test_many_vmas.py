"""Tens of thousands of VMAs (issue 9 item 6): every per-round step is O(n log n) in VMAs. A real target
with 30,000 VMAs goes through pre-dumps and a dump with writes and layout changes in between: its chain
equals its memory and the harvests report the right pages and events. Before, diff_layouts and the
harvest's retry loop compared every VMA with every other: minutes per round, which the hang guard turns
into a failure (a guard against hanging, far above the seconds these take: not a timed assertion)."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal

import numpy as np
from chaincheck import compare_with_memory
from conftest import PAGE, copied_pages, wait_idle
from test_iterations import stop_and_wait
from wpdump import ranges
from wpdump.dump import iteration
from wpdump.target import uffd
from wpdump.target.vmas import EventKind, Vma, VmaEvent, diff_layouts, read_maps
from wpdump.tracking.tracker import Policy, Tracker, classify, classify_many

N = 30_000  # pages of the striped mapping: a VMA each (every odd page read-only)
HANG_S = 60


@contextlib.contextmanager
def hang_guard(seconds: int = HANG_S):
    """Fail (not hang) if the block takes more than ``seconds``: quadratic per-VMA work took minutes."""
    def fire(*_: object) -> None:
        raise TimeoutError(f"still running after {seconds} s: per-VMA work is not O(n log n)")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def poke(t, base: int, pages: list[int]) -> None:
    """One byte written in each listed page (in commands that fit memtarget's line)."""
    for k in range(0, len(pages), 300):
        t.cmd("poke", hex(base), ",".join(map(str, pages[k : k + 300])))


def striped(t) -> int:
    """N pages, some with data, in N VMAs of one page (rw / r alternating), plus two wider rw VMAs."""
    a = t.map(N)
    t.cmd("fill", hex(a), 500, 7)
    poke(t, a, list(range(500, N, 7)))
    t.cmd("stripe", hex(a), N)
    t.cmd("mprotect", hex(a + 3000 * PAGE), 10, "rw")  # [3000, 3011): 11 pages
    t.cmd("mprotect", hex(a + 4000 * PAGE), 6, "rw")  # [4000, 4007): 7 pages
    assert len(read_maps(t.pid)) > N - 20
    return a


FILE_PAGES = 2000


def striped_file(t, tmp_path) -> int:
    """A private mapping of a FILE_PAGES file in as many VMAs, some pages COWed (written)."""
    path = tmp_path / "data"
    path.write_bytes(bytes(range(1, 256)) * (FILE_PAGES * PAGE // 255) + bytes(FILE_PAGES * PAGE % 255))
    f = t.addr("mapfile", path, FILE_PAGES, "private")
    poke(t, f, list(range(0, FILE_PAGES, 6)))
    t.cmd("stripe", hex(f), FILE_PAGES)
    return f


def change_layout(t, a: int, hole: int) -> dict[str, object]:
    """Layout changes of known outcome; returns the expected events as (kind, old span, new span) pages."""
    pg = lambda lo, hi: (a + lo * PAGE, a + hi * PAGE)  # noqa: E731
    t.cmd("mprotect", hex(a + 101 * PAGE), 39, "rw")  # [100, 141) merges 41 VMAs
    t.cmd("munmap", hex(a + 1001 * PAGE), 2)  # two VMAs vanish
    t.addr("mremap", hex(a + 3000 * PAGE), 11, 11, hex(hole))  # the 11-page VMA moves
    t.addr("fixed", hex(a + 5000 * PAGE), 4)  # a new mapping over four VMAs
    t.cmd("mprotect", hex(a + 4003 * PAGE), 1, "r")  # [4000, 4007) splits in three
    t.cmd("mprotect", hex(a + 8000 * PAGE), 1, "r")  # [7999, 8002) merges 3, read-only
    want = {(EventKind.MERGED, pg(i, i + 1), pg(100, 141)) for i in range(100, 141)}
    want |= {(EventKind.PROTECTION_CHANGED, pg(i, i + 1), pg(100, 141)) for i in range(101, 140, 2)}
    want |= {(EventKind.VANISHED, pg(i, i + 1), None) for i in (1001, 1002)}
    want.add((EventKind.MOVED, pg(3000, 3011), (hole, hole + 11 * PAGE)))
    want.add((EventKind.REPLACED, pg(5000, 5001), pg(5000, 5004)))
    want |= {(EventKind.SPLIT, pg(4000, 4007), pg(lo, hi)) for lo, hi in ((4000, 4003), (4003, 4004), (4004, 4007))}
    want.add((EventKind.PROTECTION_CHANGED, pg(4000, 4007), pg(4003, 4004)))
    want |= {(EventKind.MERGED, pg(i, i + 1), pg(7999, 8002)) for i in (7999, 8000, 8001)}
    want.add((EventKind.PROTECTION_CHANGED, pg(8000, 8001), pg(7999, 8002)))
    return want


def writable(pages: range) -> list[int]:
    """The pages of ``pages`` still writable after change_layout (odd pages are read-only)."""
    return [i for i in pages if i % 2 == 0 and not (1001 <= i <= 1002 or 3000 <= i < 3011 or 7999 <= i <= 8001)]


def spans(e: VmaEvent) -> tuple:
    return (e.kind, e.old and (e.old.start, e.old.end), e.new and (e.new.start, e.new.end))


def free_hole(t) -> int:
    """An address with 11 free pages (mapped and unmapped again)."""
    h = t.map(11)
    t.cmd("munmap", hex(h), 11)
    return h


def test_thirty_thousand_vmas_pages_and_events(target, tmp_path):
    t = target
    a = striped(t)
    f = striped_file(t, tmp_path)
    hole = free_hole(t)
    with hang_guard():
        with Tracker(t.pid) as tr:
            first = tr.initial
            assert len(first.vmas) > N - 20
            whole = {(v.vma.start, v.vma.end) for v in first.vmas if v.whole}
            assert all((a + i * PAGE, a + (i + 1) * PAGE) in whole for i in range(0, 3000, 97))
            # writes only: exactly the written pages, no event in the striped range
            written = list(range(0, N, 10))
            poke(t, a, written)
            poke(t, f, list(range(0, FILE_PAGES, 8)))
            wait_idle(t.pid)
            h = tr.harvest()
            assert copied_pages(h, a, a + N * PAGE) == {a + i * PAGE for i in written}
            assert copied_pages(h, f, f + FILE_PAGES * PAGE) == {f + i * PAGE for i in range(0, FILE_PAGES, 8)}
            # a COWed page zapped goes back to the file's content: reverted, not copied
            t.cmd("madvise", hex(f + 12 * PAGE), 1, "dontneed")
            assert not [e for e in h.events if e.new and a <= e.new.start < a + N * PAGE]
            # layout changes and writes: the events, the written pages, the moved and new VMAs whole
            want = change_layout(t, a, hole)
            later = writable(range(2, N, 40))
            poke(t, a, later)
            wait_idle(t.pid)
            h = tr.harvest()
            got = {spans(e) for e in h.events
                   if any(x and (a <= x.start < a + N * PAGE or x.start == hole) for x in (e.old, e.new))}
            assert got == want
            pages = copied_pages(h, a, a + N * PAGE)
            assert {a + i * PAGE for i in later} <= pages
            assert a + 8 * PAGE not in pages
            assert [v for v in h.vmas if v.vma.start == f + 12 * PAGE][0].reverted.tolist() == [[f + 12 * PAGE,
                                                                                                f + 13 * PAGE]]
            assert not copied_pages(h, f, f + FILE_PAGES * PAGE)
            by_start = {v.vma.start: v for v in h.vmas}
            assert by_start[hole].whole and by_start[a + 5000 * PAGE].whole
            assert h.problems == []


def test_thirty_thousand_vmas_chain_equals_memory(target, tmp_path):
    t = target
    a = striped(t)
    f = striped_file(t, tmp_path)
    hole = free_hole(t)
    (tmp_path / "img").mkdir()
    d = str(tmp_path / "img")
    with hang_guard():
        r1 = iteration.pre_dump(t.pid, f"{d}/1")
        poke(t, a, list(range(0, N, 10)))
        poke(t, f, list(range(0, FILE_PAGES, 8)))
        wait_idle(t.pid)
        r2 = iteration.pre_dump(t.pid, f"{d}/2", "../1")
        assert r2.incremental and r2.pages_parent > 0
        change_layout(t, a, hole)
        poke(t, a, writable(range(2, N, 40)))
        t.cmd("madvise", hex(a + 20 * PAGE), 1, "dontneed")
        t.cmd("madvise", hex(f + 12 * PAGE), 1, "dontneed")  # a COWed file page: the file's content again
        wait_idle(t.pid)
        r3 = iteration.pre_dump(t.pid, f"{d}/3", "../2")
        poke(t, a, writable(range(4, N, 50)))
        wait_idle(t.pid)
        r4 = iteration.dump(t.pid, f"{d}/4", "../3", leave_stopped=True)
        try:
            stop_and_wait(t.pid)
            assert r4.incremental and all(not r.warnings for r in (r1, r2, r3, r4))
            assert compare_with_memory(f"{d}/4", t.pid) > N
        finally:
            os.kill(t.pid, signal.SIGCONT)


# ---- the algorithms against their quadratic originals ----


def _ref_overlapping(vmas: list[Vma], v: Vma) -> list[Vma]:
    return [o for o in vmas if o.start < v.end and v.start < o.end]


def _ref_split_at_fresh(new: list[Vma], fresh: set[tuple[int, int]]) -> list[Vma]:
    out: list[Vma] = []
    for v in new:
        cuts = sorted({v.start, v.end} | {x for s, e in fresh for x in (s, e) if v.start < x < v.end})
        if len(cuts) == 2:
            out.append(v)
            continue
        out.extend(v._replace(start=lo, end=hi, offset=v.offset + (lo - v.start))
                   for lo, hi in zip(cuts, cuts[1:], strict=False))
    return out


def ref_diff_layouts(old: list[Vma], new: list[Vma], fresh: set[tuple[int, int]]) -> list[VmaEvent]:
    """diff_layouts as it was (quadratic): the semantics the fast one must keep exactly."""
    new = _ref_split_at_fresh(new, fresh)
    old_keys = {(o.start, o.end, o.perms, o.offset, o.identity) for o in old}
    events: list[VmaEvent] = []
    matched_old: set[Vma] = set()
    created: list[Vma] = []
    for v in new:
        if (v.start, v.end, v.perms, v.offset, v.identity) in old_keys and (v.start, v.end) not in fresh:
            matched_old.update(o for o in old if (o.start, o.end) == (v.start, v.end))
            continue
        over = _ref_overlapping(old, v)
        if (v.start, v.end) in fresh:
            created.append(v)
            if over:
                events.append(VmaEvent(EventKind.REPLACED, over[0], v))
                matched_old.update(over)
            continue
        matched_old.update(over)
        if not over:
            events.append(VmaEvent(EventKind.APPEARED, None, v))
        elif len(over) == 1 and (over[0].start, over[0].end) == (v.start, v.end):
            events.append(VmaEvent(EventKind.PROTECTION_CHANGED, over[0], v))
        elif v.start < min(o.start for o in over) or v.end > max(o.end for o in over):
            events.append(VmaEvent(EventKind.GROWN, over[0], v))
        elif len(over) > 1:
            events.extend(VmaEvent(EventKind.MERGED, o, v) for o in over)
            events.extend(VmaEvent(EventKind.PROTECTION_CHANGED, o, v) for o in over if o.perms != v.perms)
        else:
            o = over[0]
            siblings = _ref_overlapping(new, o)
            kind = EventKind.SPLIT if len(siblings) > 1 else EventKind.SHRUNK
            events.append(VmaEvent(kind, o, v))
            if v.perms != o.perms:
                events.append(VmaEvent(EventKind.PROTECTION_CHANGED, o, v))
    gone = [o for o in old if o not in matched_old]
    for v in created:
        if _ref_overlapping(old, v):
            continue
        src = next((o for o in gone if o.size == v.size and o.identity == v.identity and o.offset == v.offset), None)
        if src is not None:
            gone.remove(src)
            events.append(VmaEvent(EventKind.MOVED, src, v))
            continue
        prev = next((o for o in old if o.end == v.start and o.identity == v.identity), None)
        if prev is not None and prev.perms == v.perms and (v.inode == 0 or prev.pgoff_at(prev.end) == v.offset >> 12):
            events.append(VmaEvent(EventKind.GROWN, prev, v))
        else:
            events.append(VmaEvent(EventKind.APPEARED, None, v))
    events.extend(VmaEvent(EventKind.VANISHED, o, None) for o in gone)
    return events


IDENTITIES = [("00:00", 0, ""), ("00:00", 0, "[heap]"), ("08:01", 77, "/lib/x.so"), ("00:05", 9, "/memfd:m (deleted)")]
PERMS = ["rw-p", "r--p", "r-xp", "rw-s"]


def _vma(rng: random.Random, lo: int, hi: int, like: Vma | None = None) -> Vma:
    if like is not None and rng.random() < 0.7:
        return like._replace(start=lo * PAGE, end=hi * PAGE)
    dev, inode, path = rng.choice(IDENTITIES)
    return Vma(lo * PAGE, hi * PAGE, rng.choice(PERMS), rng.choice((0, lo * PAGE, 3 * PAGE)), dev, inode, path)


def _layout(rng: random.Random, pages: int) -> list[Vma]:
    out, p = [], 0
    while True:
        p += rng.choice((0, 0, 1, 2))
        n = rng.randint(1, 5)
        if p + n > pages:
            return out
        out.append(_vma(rng, p, p + n))
        p += n


def _mutate(rng: random.Random, old: list[Vma], pages: int) -> tuple[list[Vma], set[tuple[int, int]]]:
    """A new layout from ``old`` by the changes a process makes (keep, mprotect, split, shrink, grow, move,
    replace, unmap, merge, map), with the fresh spans a harvest would report."""
    new: list[Vma] = []
    fresh: set[tuple[int, int]] = set()
    for o in old:
        lo, hi = o.start // PAGE, o.end // PAGE
        op = rng.random()
        if op < 0.45:
            new.append(o)
        elif op < 0.55:
            new.append(o._replace(perms=rng.choice(PERMS)))
        elif op < 0.65 and hi - lo > 1:
            m = rng.randint(lo + 1, hi - 1)
            new += [o._replace(end=m * PAGE), o._replace(start=m * PAGE, offset=o.offset + (m - lo) * PAGE,
                                                         perms=rng.choice(PERMS))]
        elif op < 0.7 and hi - lo > 1:
            new.append(o._replace(end=(hi - 1) * PAGE) if rng.random() < 0.5 else o._replace(start=(lo + 1) * PAGE))
        elif op < 0.75:
            new.append(o._replace(end=(hi + rng.randint(1, 3)) * PAGE))
        elif op < 0.82:  # moved (or replaced) far away: created, found unregistered
            at = pages + rng.randint(0, 3 * pages)
            v = o._replace(start=at * PAGE, end=(at + hi - lo) * PAGE)
            if rng.random() < 0.3:
                v = _vma(rng, at, at + hi - lo)
            new.append(v)
            fresh.add((v.start, v.end))
        elif op < 0.88:  # a new mapping in place (MAP_FIXED), maybe merged into a neighbour on registration
            v = _vma(rng, lo, hi, o)
            new.append(v)
            fresh.add((v.start, v.end))
        elif op < 0.93 and new and new[-1].end == o.start:
            last = new.pop()
            new.append(last._replace(end=o.end))
        elif op < 0.97:  # grown by a new mapping beside it (brk)
            new.append(o)
            k = rng.randint(1, 3)
            v = o._replace(start=o.end, end=o.end + k * PAGE, offset=o.offset + o.size)
            new.append(v)
            fresh.add((v.start, v.end))
        # else: unmapped
    # new mappings in holes, some right after a VMA (brk-like growth), some fresh
    for _ in range(rng.randint(0, 3)):
        at = rng.randint(0, 4 * pages)
        v = _vma(rng, at, at + rng.randint(1, 4), rng.choice(old) if old else None)
        new.append(v)
        if rng.random() < 0.7:
            fresh.add((v.start, v.end))
    new.sort(key=lambda v: v.start)
    disjoint: list[Vma] = []
    for v in new:
        if not disjoint or disjoint[-1].end <= v.start:
            disjoint.append(v)
    # fresh spans stay as they were: a VMA registered this round may have been unmapped or split since
    # registration merged a fresh VMA into its tracked neighbour: the harvest saw the piece only
    merged: list[Vma] = []
    for w in disjoint:
        if merged and merged[-1].end == w.start and (w.start, w.end) in fresh and rng.random() < 0.3:
            merged[-1] = merged[-1]._replace(end=w.end)
        else:
            merged.append(w)
    return merged, fresh


def test_diff_layouts_keeps_the_events_of_the_quadratic_original():
    rng = random.Random(9)
    kinds: set[EventKind] = set()
    for _ in range(6000):
        pages = rng.randint(4, 40)
        old = _layout(rng, pages)
        new, fresh = _mutate(rng, old, pages)
        want = ref_diff_layouts(old, new, fresh)
        assert diff_layouts(old, new, fresh) == want, (old, new, fresh)
        kinds |= {e.kind for e in want}
    assert kinds == set(EventKind)  # every kind of event was compared


def test_classify_many_equals_classify_one_by_one():
    rng = np.random.default_rng(6)
    cats = [uffd.PAGE_IS_WRITTEN | x for x in (
        0, uffd.PAGE_IS_PRESENT, uffd.PAGE_IS_SWAPPED, uffd.PAGE_IS_PRESENT | uffd.PAGE_IS_PFNZERO,
        uffd.PAGE_IS_PRESENT | uffd.PAGE_IS_FILE, uffd.PAGE_IS_SWAPPED | uffd.PAGE_IS_GUARD,
        uffd.PAGE_IS_PRESENT | uffd.PAGE_IS_HUGE, uffd.PAGE_IS_FILE)]
    kinds = [("rw-p", 0, ""), ("rw-p", 0, "[heap]"), ("rw-s", 5, "/dev/shm/x"), ("rw-p", 77, "/lib/x.so"),
             ("rw-p", 0, "/memfd:y (deleted)")]
    for _ in range(200):
        vmas, regs, counts, p = [], [], [], 0x10000
        for _ in range(int(rng.integers(1, 30))):
            n = int(rng.integers(1, 12))
            perms, inode, path = kinds[int(rng.integers(len(kinds)))]
            v = Vma(p, p + n * PAGE, perms, 0, "00:00", inode, path)
            pages = np.flatnonzero(rng.random(n) < 0.5)  # touching regions, also across VMAs
            for i in pages.tolist():
                regs.append((p + i * PAGE, p + (i + 1) * PAGE, cats[int(rng.integers(len(cats)))]))
            vmas.append(v)
            counts.append(len(pages))
            p = v.end if rng.random() < 0.6 else v.end + PAGE
        regions = np.array(regs, dtype=uffd.REGION_DTYPE)
        whole = bool(rng.integers(2))
        got = classify_many(vmas, regions, np.array(counts), Policy.TRACK, whole)
        ends = np.cumsum(counts)
        for v, g, c, e in zip(vmas, got, counts, ends.tolist(), strict=True):
            w = classify(v, regions[e - c : e], Policy.TRACK, whole)
            assert (g.vma, g.policy, g.whole) == (w.vma, w.policy, w.whole)
            for field in ("copy", "zero", "reverted", "guard"):
                assert np.array_equal(getattr(g, field).reshape(-1, 2), getattr(w, field).reshape(-1, 2)), field


def test_scan_ranges_with_a_small_buffer_equals_one_scan_per_vma(target):
    """scan_ranges goes on after a VMA whose regions filled the buffer, and reports EPERM per VMA."""
    t = target
    a = t.map(400)
    t.cmd("stripe", hex(a), 400)
    b = t.map(64)
    with Tracker(t.pid) as tr:
        plain = t.map(8)  # mapped after the attach: unregistered
        poke(t, a, list(range(0, 400, 4)))
        poke(t, b, list(range(0, 64, 2)))  # 32 regions in one VMA
        wait_idle(t.pid)
        mine = ranges.from_pairs([(a, a + 400 * PAGE), (b, b + 64 * PAGE)])
        vmas = ranges.from_pairs([(v.vma.start, v.vma.end) for v in tr.initial.vmas if v.policy is Policy.TRACK])
        spans = np.array(sorted({(int(s), int(e)) for s, e in vmas[ranges.overlaps(vmas, mine)]}
                                | {(plain, plain + 8 * PAGE)}), dtype=np.uint64)
        assert len(spans) > 400
        masks = np.full(len(spans), uffd.CLASSIFY_MASK, dtype=np.uint64)
        fd = os.open(f"/proc/{t.pid}/pagemap", os.O_RDONLY)
        try:
            kw = {"flags": 0}  # report without re-protecting: every call sees the same
            one = [uffd.scan_all(fd, int(s), int(e), uffd.RegionBuffer(64), **kw) for s, e in spans]
            assert max(len(r) for r in one) >= 32
            for cap in (1, 3, 64):
                regions, counts, errs = uffd.scan_ranges(fd, spans, masks, uffd.RegionBuffer(cap), **kw)
                assert counts.tolist() == [len(r) for r in one] and not errs.any()
                assert np.array_equal(regions, np.concatenate(one))
            regions, counts, errs = uffd.scan_ranges(fd, spans, masks, uffd.RegionBuffer(3))
            assert errs[spans[:, 0] == plain].tolist() == [errno.EPERM]
            assert counts[spans[:, 0] == plain].tolist() == [0] and not errs[spans[:, 0] != plain].any()
            assert len(regions) == counts.sum()
        finally:
            os.close(fd)


def test_range_lookups_equal_the_linear_ones():
    """ranges.overlaps and ranges.clip_sorted (binary search) against a plain scan of every range."""
    rng = random.Random(3)
    for _ in range(2000):
        starts = sorted(rng.sample(range(0, 90, 3), rng.randint(0, 9)))
        r = ranges.merge(np.array([(a, a + rng.randint(1, 9)) for a in starts], dtype=np.uint64).reshape(-1, 2))
        q = np.array([(a, a + rng.randint(1, 12)) for a in rng.sample(range(100), rng.randint(0, 6))],
                     dtype=np.uint64).reshape(-1, 2)
        want = [any(int(s) < b and a < int(e) for s, e in r) for a, b in q.tolist()]
        assert ranges.overlaps(q, r).tolist() == want
        for lo, hi in q.tolist():
            assert ranges.clip_sorted(r, lo, hi).tolist() == ranges.clip(r, lo, hi).tolist()
