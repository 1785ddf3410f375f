"""Layout changes and zapped pages on a real target: exact write reports, VMA events, and an image
rebuilt only from what the harvests report that equals /proc/PID/mem byte for byte."""

from __future__ import annotations

import bisect
import os

from conftest import PAGE, copied_pages, page_set, wait_idle, zero_pages
from wpdump import ranges
from wpdump.target import uffd
from wpdump.target.vmas import EventKind, Policy, read_maps
from wpdump.tracking.tracker import Harvest, Tracker

ZERO = bytes(PAGE)


class Model:
    """A checkpoint image built only from harvests: page address -> content; absent means zero.

    ``whole`` VMAs replace everything the image held there; ``zero`` ranges clear pages; ``copy``
    ranges are read from the target right after the harvest (the target idles between commands).
    """

    def __init__(self, tracker: Tracker) -> None:
        self.pid = tracker.pid
        self.pages: dict[int, bytes] = {}
        self.last = tracker.initial
        self.apply(tracker.initial)

    def _drop(self, lo: int, hi: int) -> None:
        for p in [p for p in self.pages if lo <= p < hi]:
            del self.pages[p]

    def apply(self, h: Harvest) -> Harvest:
        cp = h.copy_ranges()
        buf = bytearray(ranges.total(cp))
        if len(buf):
            assert uffd.read_ranges(self.pid, cp, buf) == len(buf)
        content: dict[int, bytes] = {}
        off = 0
        for s, e in cp:
            for p in range(int(s), int(e), PAGE):
                content[p] = bytes(buf[off : off + PAGE])
                off += PAGE
        for vp in h.vmas:
            lo, hi = vp.vma.start, vp.vma.end
            # every reported range lies inside its VMA, and copy / zero never overlap
            for r in (vp.copy, vp.zero, vp.reverted, vp.guard):
                assert all(lo <= int(s) < int(e) <= hi for s, e in r), (vp.vma, r)
            if vp.vma.anonymous:  # private file mappings: see test_private_file_mapping_written_page
                assert not page_set(vp.copy) & page_set(vp.zero), vp.vma
            if vp.whole:
                self._drop(lo, hi)
            for s, e in (*vp.zero, *vp.reverted):
                self._drop(int(s), int(e))
            for p in page_set(vp.copy):
                self.pages[p] = content[p]
        live = sorted((v.vma.start, v.vma.end) for v in h.vmas)
        starts = [s for s, _ in live]

        def mapped(p: int) -> bool:
            i = bisect.bisect_right(starts, p) - 1
            return i >= 0 and p < live[i][1]

        self.pages = {p: c for p, c in self.pages.items() if mapped(p)}
        self.last = h
        return h

    def harvest(self, tr: Tracker) -> Harvest:
        wait_idle(self.pid)
        return self.apply(tr.harvest())

    def check(self, regions: list[tuple[int, int]] | None = None) -> int:
        """Compare the image with /proc/PID/mem over ``regions`` (default: every tracked anonymous
        VMA of the last harvest: heap, stack, anonymous mmaps). Returns the pages compared."""
        if regions is None:
            regions = [(v.vma.start, v.vma.end) for v in self.last.vmas if v.vma.anonymous and v.policy is Policy.TRACK]
        bad: list[int] = []
        n = 0
        with open(f"/proc/{self.pid}/mem", "rb", buffering=0) as f:
            for lo, hi in regions:
                data = _pread(f.fileno(), lo, hi - lo)
                for i in range(0, hi - lo, PAGE):
                    n += 1
                    if data[i : i + PAGE] != self.pages.get(lo + i, ZERO):
                        bad.append(lo + i)
        assert not bad, f"{len(bad)} pages differ from the image, first at {bad[0]:#x}: {[hex(b) for b in bad[:8]]}"
        return n


def attach(target) -> Tracker:
    wait_idle(target.pid)
    return Tracker(target.pid)


def _pread(fd: int, at: int, length: int) -> bytes:
    out = b""
    while len(out) < length:
        chunk = os.pread(fd, length - len(out), at + len(out))
        assert chunk, f"short read at {at + len(out):#x}"
        out += chunk
    return out


def iso_map(target, pages: int, room_after: int = 0) -> int:
    """An anonymous mapping of ``pages`` with a one-page hole before it and ``room_after`` + 1 free
    pages after it, so that it never merges with a neighbour."""
    a0 = target.map(pages + 2 + room_after)
    target.cmd("munmap", hex(a0), 1)
    target.cmd("munmap", hex(a0 + (pages + 1) * PAGE), 1 + room_after)
    return a0 + PAGE


def free_spot(target, pages: int) -> int:
    """An address where ``pages`` fit with a free page on either side (nothing mapped there now)."""
    a0 = target.map(pages + 2)
    target.cmd("munmap", hex(a0), pages + 2)
    return a0 + PAGE


def pages_of(a: int, idx) -> set[int]:
    return {a + i * PAGE for i in idx}


def rel(a: int, pages: set[int]) -> list[int]:
    return sorted((p - a) // PAGE for p in pages)


def vma_pages(h: Harvest, start: int):
    found = [v for v in h.vmas if v.vma.start == start]
    assert len(found) == 1, [str(v.vma) for v in h.vmas]
    return found[0]


def events(h: Harvest, kind: EventKind) -> list:
    return [e for e in h.events if e.kind is kind]


def mem_page(target, p: int) -> bytes:
    return target.read_mem(p, PAGE)


# ---- written pages ----


def test_written_pages_reported_exactly(target):
    a = target.map(64)
    end = a + 64 * PAGE
    target.cmd("fill", hex(a), 24, 1)
    with attach(target) as tr:
        m = Model(tr)
        assert copied_pages(tr.initial, a, end) == pages_of(a, range(24))  # attach: all content
        m.check()
        m.harvest(tr)  # noise of the attach itself
        target.cmd("read", hex(a), 64)  # reads of filled and never-touched pages
        target.cmd("poke", hex(a), "3,5,40")  # 3, 5 filled; 40 never touched before
        h = m.harvest(tr)
        assert rel(a, copied_pages(h, a, end)) == [3, 5, 40]
        assert zero_pages(h, a, end) == set()
        assert not h.events
        m.check()
        # a round without writes reports nothing in the mapping; reads still do not count
        target.cmd("read", hex(a), 64)
        h = m.harvest(tr)
        assert copied_pages(h, a, end) == set() and zero_pages(h, a, end) == set()
        # the same page written twice in a round is reported once; neighbours stay clean
        target.cmd("poke", hex(a), "63,63,0")
        h = m.harvest(tr)
        assert rel(a, copied_pages(h, a, end)) == [0, 63]
        assert m.check() >= 64
        assert m.pages[a + 40 * PAGE][0] == 1 and m.pages[a + 40 * PAGE][1:] == ZERO[1:]


# ---- zapped pages ----


def test_madv_dontneed_reports_zero_not_copy(target):
    a = iso_map(target, 64)
    end = a + 64 * PAGE
    target.cmd("fill", hex(a), 32, 2)
    with attach(target) as tr:
        m = Model(tr)
        m.harvest(tr)
        target.cmd("madvise", hex(a), 4, "dontneed")  # filled, zapped
        target.cmd("poke", hex(a), "10,11")  # filled, rewritten, then zapped in the same round
        target.cmd("madvise", hex(a + 10 * PAGE), 2, "dontneed")
        target.cmd("poke", hex(a), "50")  # never touched: populated, then zapped
        target.cmd("madvise", hex(a + 50 * PAGE), 1, "dontneed")
        target.cmd("madvise", hex(a + 20 * PAGE), 1, "dontneed")  # zapped, then written again
        target.cmd("poke", hex(a), "20")
        h = m.harvest(tr)
        assert rel(a, copied_pages(h, a, end)) == [20]
        zapped = pages_of(a, [0, 1, 2, 3, 10, 11, 50])
        assert zapped <= zero_pages(h, a, end) <= zapped | {a + 20 * PAGE}
        assert a + 20 * PAGE not in zero_pages(h, a, end)
        for p in zapped:
            assert mem_page(target, p) == ZERO
        m.check()
        # zapped pages are clean afterwards until written again
        target.cmd("poke", hex(a), "2")
        h = m.harvest(tr)
        assert rel(a, copied_pages(h, a, end)) == [2]
        assert zero_pages(h, a, end) == set()
        m.check()


def present_in_pagemap(pid: int, addr: int) -> bool:
    """Whether the page at ``addr`` is present (pagemap bit 63), read without faulting it in."""
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as f:
        return bool(int.from_bytes(os.pread(f.fileno(), 8, addr // PAGE * 8), "little") >> 63)


def test_madv_free_then_pageout(target):
    # Reclaim skips a folio still in a per-CPU batch (lru_add after the fill, lru_lazyfree after MADV_FREE,
    # activate after this test reads it through /proc/PID/mem: the batch's reference makes reclaim take a
    # lazy-free folio for re-dirtied, for good). MADV_FREE and MADV_PAGEOUT drain only the batches of the
    # CPU they run on: the target and this test run on one CPU, so every batch is drained (docs/kernel.md rule 32).
    cpu = {min(os.sched_getaffinity(0))}
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(target.pid, cpu)
    os.sched_setaffinity(0, cpu)
    try:
        _madv_free_then_pageout(target)
    finally:
        os.sched_setaffinity(0, mine)


def _madv_free_then_pageout(target) -> None:
    a = iso_map(target, 64)
    end = a + 64 * PAGE
    target.cmd("fill", hex(a), 32, 3)
    with attach(target) as tr:
        m = Model(tr)
        m.harvest(tr)
        # MADV_FREE alone: the pages keep their content until reclaim; nothing may be reported zero
        target.cmd("madvise", hex(a + 8 * PAGE), 8, "free")
        h = m.harvest(tr)
        for p in zero_pages(h, a, end):
            assert mem_page(target, p) == ZERO, f"page {p:#x} reported zero but holds data"
        m.check()
        # reclaim (no swap here): clean lazy-free pages are discarded and read zero; page 12,
        # written after MADV_FREE, is dirty again and must survive with its new content
        target.cmd("poke", hex(a), "12")
        target.cmd("madvise", hex(a + 8 * PAGE), 8, "pageout")
        # a folio that compaction holds at that moment escapes reclaim and turns dirty again for good:
        # advise those again (never page 12), watching pagemap's present bit (it faults nothing in)
        for _ in range(20):
            left = [i for i in range(8, 16) if i != 12 and present_in_pagemap(target.pid, a + i * PAGE)]
            if not left:
                break
            for i in left:
                target.cmd("madvise", hex(a + i * PAGE), 1, "free")
                target.cmd("madvise", hex(a + i * PAGE), 1, "pageout")
        h = m.harvest(tr)
        copied, zeroed = copied_pages(h, a, end), zero_pages(h, a, end)
        assert a + 12 * PAGE in copied
        assert mem_page(target, a + 12 * PAGE) != ZERO
        assert copied <= pages_of(a, range(8, 16))
        discarded = set()
        for i in range(8, 16):
            p = a + i * PAGE
            data = mem_page(target, p)
            if p in zeroed:
                assert data == ZERO, f"page {i} reported zero but holds data"
            if data == ZERO:
                discarded.add(i)
                assert p in zeroed, f"page {i} was discarded but not reported zero"
            elif p not in copied:
                assert m.pages[p] == data  # left clean: the image already holds this content
        # every clean lazy-free page was discarded; page 12, dirty again, was kept
        assert discarded == set(range(8, 16)) - {12}
        m.check()
        # pages outside the advised range were untouched
        assert copied_pages(h, a, a + 8 * PAGE) == set() and zero_pages(h, a, a + 8 * PAGE) == set()


# ---- layout events ----


def test_new_mmap_appears_and_is_dumped_whole(target):
    with attach(target) as tr:
        m = Model(tr)
        m.harvest(tr)
        b = iso_map(target, 16)
        target.cmd("fill", hex(b), 10, 4)
        h = m.harvest(tr)
        ev = events(h, EventKind.APPEARED)
        assert [(e.new.start, e.new.end) for e in ev] == [(b, b + 16 * PAGE)]
        assert ev[0].old is None
        vp = vma_pages(h, b)
        assert vp.whole and vp.policy is Policy.TRACK
        assert rel(b, page_set(vp.copy)) == list(range(10))
        m.check()
        # from now on it is tracked: only writes are reported
        target.cmd("poke", hex(b), "1,12")
        h = m.harvest(tr)
        assert rel(b, copied_pages(h, b, b + 16 * PAGE)) == [1, 12]
        assert not vma_pages(h, b).whole and not h.events
        m.check()


def test_brk_growth_is_dumped(target):
    with attach(target) as tr:
        m = Model(tr)
        m.harvest(tr)
        heap = [v for v in read_maps(target.pid) if v.path == "[heap]"]
        assert len(heap) == 1
        old = target.addr("brk", 8)
        assert old == heap[0].end  # the break sat at the end of the heap VMA
        target.cmd("fill", hex(old), 8, 5)
        h = m.harvest(tr)
        ev = [e for e in h.events if e.kind in (EventKind.GROWN, EventKind.APPEARED)]
        assert ev, [str(e) for e in h.events]
        assert any(e.new.start <= old and old + 8 * PAGE <= e.new.end for e in ev)
        assert not events(h, EventKind.VANISHED)
        assert pages_of(old, range(8)) <= copied_pages(h, old, old + 8 * PAGE)
        assert any(v.whole and v.vma.start <= old < v.vma.end for v in h.vmas)
        m.check()
        # the grown heap is tracked afterwards: one write, one page
        target.cmd("poke", hex(old), "6")
        h = m.harvest(tr)
        # (the old heap part holds the target's stdio buffers: written by every command)
        assert copied_pages(h, old, old + 8 * PAGE) == {old + 6 * PAGE}
        m.check()


def test_map_fixed_over_tracked_range_is_replaced(target):
    a = iso_map(target, 32)
    end = a + 32 * PAGE
    target.cmd("fill", hex(a), 32, 6)
    with attach(target) as tr:
        m = Model(tr)
        m.harvest(tr)
        mid = a + 8 * PAGE
        assert target.addr("fixed", hex(mid), 8) == mid
        target.cmd("fill", hex(mid), 6, 7)  # pages 6, 7 of the new mapping stay zero
        h = m.harvest(tr)
        rep = events(h, EventKind.REPLACED)
        assert [(e.old.start, e.old.end, e.new.start, e.new.end) for e in rep] == [(a, end, mid, mid + 8 * PAGE)]
        split = events(h, EventKind.SPLIT)
        assert sorted((e.new.start, e.new.end) for e in split) == [(a, mid), (mid + 8 * PAGE, end)]
        vp = vma_pages(h, mid)
        assert vp.whole and rel(mid, page_set(vp.copy)) == list(range(6))
        assert copied_pages(h, a, mid) == set() and copied_pages(h, mid + 8 * PAGE, end) == set()
        m.check()
        assert m.pages.get(mid + 7 * PAGE) is None  # the old content there is gone from the image
        # a MAP_FIXED over the whole VMA: the old content must not survive in the image
        assert target.addr("fixed", hex(a), 8) == a
        h = m.harvest(tr)
        rep = events(h, EventKind.REPLACED)
        assert [(e.old.start, e.old.end, e.new.start, e.new.end) for e in rep] == [(a, mid, a, mid)]
        assert vma_pages(h, a).whole and copied_pages(h, a, mid) == set()
        assert not [p for p in m.pages if a <= p < mid]
        m.check()
        target.cmd("poke", hex(a), "0,9,20")
        h = m.harvest(tr)
        assert rel(a, copied_pages(h, a, end)) == [0, 9, 20]
        m.check()


def test_mremap_move_is_moved_and_copied(target):
    a = iso_map(target, 16)
    target.cmd("fill", hex(a), 16, 8)
    with attach(target) as tr:
        m = Model(tr)
        m.harvest(tr)
        before = {p - a: c for p, c in m.pages.items() if a <= p < a + 16 * PAGE}
        assert len(before) == 16
        d = free_spot(target, 16)
        assert target.addr("mremap", hex(a), 16, 16, hex(d)) == d
        h = m.harvest(tr)
        mv = events(h, EventKind.MOVED)
        assert [(e.old.start, e.old.end, e.new.start, e.new.end) for e in mv] == [(a, a + 16 * PAGE, d, d + 16 * PAGE)]
        assert not events(h, EventKind.VANISHED) and not events(h, EventKind.APPEARED)
        vp = vma_pages(h, d)
        assert vp.whole and rel(d, page_set(vp.copy)) == list(range(16))
        assert not [v for v in h.vmas if v.vma.start < a + 16 * PAGE and a < v.vma.end]
        # the image at the new place holds exactly the content that was at the old place
        assert {p - d: c for p, c in m.pages.items() if d <= p < d + 16 * PAGE} == before
        assert not [p for p in m.pages if a <= p < a + 16 * PAGE]
        m.check()
        target.cmd("poke", hex(d), "4")
        h = m.harvest(tr)
        assert copied_pages(h, d, d + 16 * PAGE) == {d + 4 * PAGE}
        m.check()


def test_mremap_grow_in_place(target):
    a = iso_map(target, 16, room_after=16)
    target.cmd("fill", hex(a), 16, 9)
    with attach(target) as tr:
        m = Model(tr)
        m.harvest(tr)
        assert target.addr("mremap", hex(a), 16, 32) == a  # room after it: grows in place
        h = m.harvest(tr)
        gr = events(h, EventKind.GROWN)
        assert [(e.old.start, e.old.end, e.new.start, e.new.end) for e in gr] == [(a, a + 16 * PAGE, a, a + 32 * PAGE)]
        assert copied_pages(h, a, a + 32 * PAGE) == set()  # growing writes nothing
        assert zero_pages(h, a, a + 16 * PAGE) == set()  # the old part is untouched
        assert not vma_pages(h, a).whole
        m.check()
        target.cmd("poke", hex(a), "20,31,2")
        h = m.harvest(tr)
        assert rel(a, copied_pages(h, a, a + 32 * PAGE)) == [2, 20, 31]
        assert zero_pages(h, a, a + 32 * PAGE) == set()
        m.check()


def test_munmap_vanishes(target):
    a = iso_map(target, 8)
    b = iso_map(target, 16)
    target.cmd("fill", hex(a), 8, 10)
    target.cmd("fill", hex(b), 16, 11)
    with attach(target) as tr:
        m = Model(tr)
        m.harvest(tr)
        target.cmd("munmap", hex(a), 8)
        target.cmd("munmap", hex(b + 12 * PAGE), 4)  # the tail of b
        h = m.harvest(tr)
        van = events(h, EventKind.VANISHED)
        assert [(e.old.start, e.old.end, e.new) for e in van] == [(a, a + 8 * PAGE, None)]
        sh = events(h, EventKind.SHRUNK)
        assert [(e.old.start, e.old.end, e.new.start, e.new.end) for e in sh] == [(b, b + 16 * PAGE, b, b + 12 * PAGE)]
        assert not [v for v in h.vmas if v.vma.start < a + 8 * PAGE and a < v.vma.end]
        assert copied_pages(h, b, b + 16 * PAGE) == set()
        assert not [p for p in m.pages if a <= p < a + 8 * PAGE or b + 12 * PAGE <= p < b + 16 * PAGE]
        m.check()


def test_mprotect_split_keeps_tracking_both_parts(target):
    a = iso_map(target, 32)
    end = a + 32 * PAGE
    mid, mid_end = a + 8 * PAGE, a + 16 * PAGE
    target.cmd("fill", hex(a), 32, 12)
    with attach(target) as tr:
        m = Model(tr)
        m.harvest(tr)
        target.cmd("mprotect", hex(mid), 8, "r")
        h = m.harvest(tr)
        split = events(h, EventKind.SPLIT)
        assert all((e.old.start, e.old.end) == (a, end) for e in split)
        assert sorted((e.new.start, e.new.end) for e in split) == [(a, mid), (mid, mid_end), (mid_end, end)]
        pc = events(h, EventKind.PROTECTION_CHANGED)
        assert [(e.new.start, e.new.end, e.old.perms, e.new.perms) for e in pc] == [(mid, mid_end, "rw-p", "r--p")]
        assert copied_pages(h, a, end) == set() and zero_pages(h, a, end) == set()
        assert all(not vma_pages(h, s).whole for s in (a, mid, mid_end))
        m.check()
        # writes on both sides of the read-only part are reported, in this round and the next
        for round_pokes in (("1", "20"), ("7", "31")):
            target.cmd("poke", hex(a), ",".join(round_pokes))
            h = m.harvest(tr)
            assert rel(a, copied_pages(h, a, end)) == sorted(int(x) for x in round_pokes)
            m.check()
        # back to read-write (the three VMAs merge again): the old middle part is tracked too
        target.cmd("mprotect", hex(mid), 8, "rw")
        target.cmd("poke", hex(a), "9,30")
        h = m.harvest(tr)
        assert rel(a, copied_pages(h, a, end)) == [9, 30]
        assert [(v.vma.start, v.vma.end) for v in h.vmas if a <= v.vma.start < end] == [(a, end)]
        m.check()


def test_mprotect_merge_back_is_not_reported_as_shrunk(target):
    """mprotect making [rw][r][rw] uniform again merges three VMAs into one: that is neither a
    shrink nor a split, and the middle part's protection did change."""
    a = iso_map(target, 32)
    end = a + 32 * PAGE
    mid, mid_end = a + 8 * PAGE, a + 16 * PAGE
    with attach(target) as tr:
        target.cmd("mprotect", hex(mid), 8, "r")
        tr.harvest()
        target.cmd("mprotect", hex(mid), 8, "rw")
        h = tr.harvest()
        mine = [e for e in h.events if (e.old or e.new).start < end and a < (e.old or e.new).end]
        assert mine, "the merge produced no event"
        for e in mine:
            if e.kind in (EventKind.SHRUNK, EventKind.SPLIT):
                assert e.new.size < e.old.size, f"{e}: the VMA got bigger"
        pc = [e for e in mine if e.kind is EventKind.PROTECTION_CHANGED]
        assert [(e.old.start, e.old.end, e.old.perms, e.new.perms) for e in pc] == [(mid, mid_end, "r--p", "rw-p")]


def test_private_file_mapping_written_page(target, tmp_path):
    """A written page of a private file mapping is copied, and never also reported zero."""
    path = tmp_path / "data"
    path.write_bytes(bytes(range(256)) * (16 * PAGE // 256))
    a = target.addr("mapfile", path, 16, "private")
    end = a + 16 * PAGE
    target.cmd("poke", hex(a), "1,2")  # COWed before the attach
    with attach(target) as tr:
        # the attach dumps every present page (file pages mapped by fault-around too)
        assert {1, 2} <= set(rel(a, copied_pages(tr.initial, a, end)))
        wait_idle(target.pid)
        tr.harvest()
        target.cmd("poke", hex(a), "2,9")
        wait_idle(target.pid)
        h = tr.harvest()
        vp = vma_pages(h, a)
        assert rel(a, page_set(vp.copy)) == [2, 9]
        assert rel(a, page_set(vp.zero)) == []
        assert rel(a, page_set(vp.reverted)) == []


def test_private_file_mapping_zapped_cow_page_is_reverted(target, tmp_path):
    """MADV_DONTNEED on a written (COWed) page of a private file mapping gives the file's content
    back: the image must learn it (``reverted``), or it keeps the stale written content."""
    path = tmp_path / "data"
    path.write_bytes(bytes(range(256)) * (16 * PAGE // 256))
    a = target.addr("mapfile", path, 16, "private")
    with attach(target) as tr:
        target.cmd("poke", hex(a), "9")
        wait_idle(target.pid)
        assert a + 9 * PAGE in page_set(vma_pages(tr.harvest(), a).copy)
        target.cmd("madvise", hex(a + 9 * PAGE), 1, "dontneed")
        target.cmd("poke", hex(a), "4")
        wait_idle(target.pid)
        h = tr.harvest()
        vp = vma_pages(h, a)
        assert target.read_mem(a + 9 * PAGE, PAGE) == path.read_bytes()[9 * PAGE : 10 * PAGE]
        assert rel(a, page_set(vp.copy)) == [4]
        assert rel(a, page_set(vp.reverted)) == [9], "page 9 went back to the file's content unreported"
