"""vmas: /proc/PID/maps and smaps parsing (hand-written lines, and this process's own maps with a mapped file
whose name has spaces and was deleted), the tracking policy, and diff_layouts: one hand-made layout per
EventKind, then random layouts checked for properties every diff must have."""

from __future__ import annotations

import ctypes
import mmap
import os
import pathlib
import random
import re

import pytest
from wpdump.target.vmas import (
    EventKind,
    Policy,
    Vma,
    VmaEvent,
    diff_layouts,
    from_tuples,
    parse_maps_line,
    policy_for,
    read_maps,
    read_vmflags,
)

PAGE = 4096


# ------------------------------------------------------------------------------------------------ parsing

@pytest.mark.parametrize(("line", "want"), [
    ("7f5544bb9000-7f5544bbc000 rw-p 00000000 00:00 0 \n",
     (0x7F5544BB9000, 0x7F5544BBC000, "rw-p", 0, "00:00", 0, "")),
    ("560d8095e000-560d809a0000 rw-p 00000000 00:00 0                          [heap]\n",
     (0x560D8095E000, 0x560D809A0000, "rw-p", 0, "00:00", 0, "[heap]")),
    ("55e444986000-55e44498b000 r-xp 00002000 fe:00 260131                     /usr/bin/cat\n",
     (0x55E444986000, 0x55E44498B000, "r-xp", 0x2000, "fe:00", 260131, "/usr/bin/cat")),
    ("7f0000000000-7f0000002000 rw-s 00001000 00:1f 42    /tmp/dir with  spaces/a b.bin (deleted)\n",
     (0x7F0000000000, 0x7F0000002000, "rw-s", 0x1000, "00:1f", 42, "/tmp/dir with  spaces/a b.bin (deleted)")),
    ("7f0000000000-7f0000001000 rw-s 00000000 00:01 7 /memfd:name with space (deleted)",
     (0x7F0000000000, 0x7F0000001000, "rw-s", 0, "00:01", 7, "/memfd:name with space (deleted)")),
    ("7f0000000000-7f0000001000 rw-p 00000000 00:00 0    [anon:my buffer]\n",
     (0x7F0000000000, 0x7F0000001000, "rw-p", 0, "00:00", 0, "[anon:my buffer]")),
    ("7f0000000000-7f0000001000 r--p 123456789abc 103:02 18446744 /x/trailing space \n",
     (0x7F0000000000, 0x7F0000001000, "r--p", 0x123456789ABC, "103:02", 18446744, "/x/trailing space ")),
    ("ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]\n",
     (0xFFFFFFFFFF600000, 0xFFFFFFFFFF601000, "--xp", 0, "00:00", 0, "[vsyscall]")),
])
def test_parse_maps_line(line: str, want: tuple) -> None:
    v = parse_maps_line(line)
    assert isinstance(v, Vma) and tuple(v) == want
    assert v == Vma(*want) and hash(v) == hash(Vma(*want))


def test_vma_properties() -> None:
    anon = Vma(0x1000, 0x3000, "rw-p", 0, "00:00", 0, "")
    assert anon.size == 0x2000 and anon.anonymous and not anon.shared and not anon.secret
    assert Vma(0x1000, 0x2000, "rw-p", 0, "00:00", 0, "[heap]").anonymous
    assert not Vma(0x1000, 0x2000, "rw-p", 0, "00:00", 0, "/memfd:x (deleted)").anonymous
    lib = Vma(0x10000, 0x14000, "r--p", 0x3000, "08:01", 77, "/lib/a b.so")
    assert not lib.anonymous and lib.pgoff_at(0x10000) == 3 and lib.pgoff_at(0x12000) == 5
    shm = Vma(0x1000, 0x2000, "rw-s", 0, "00:01", 5, "/dev/zero (deleted)")
    assert shm.shared and not shm.anonymous and not shm.secret
    assert Vma(0x1000, 0x2000, "rw-s", 0, "00:08", 3, "/secretmem (deleted)").secret
    assert lib.identity == ("08:01", 77, "/lib/a b.so", False)
    assert str(lib) == "0x10000-0x14000 r--p /lib/a b.so" and str(anon) == "0x1000-0x3000 rw-p"
    assert from_tuples([tuple(lib)]) == [lib] and type(from_tuples([tuple(lib)])[0]) is Vma


def maps_oracle(text: str) -> list[tuple]:
    """An independent parse of maps text (a regex per line)."""
    out = []
    for line in text.splitlines():
        m = re.fullmatch(r"([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) (\S+) (\d+) ?\s*(.*)", line)
        assert m, line
        s, e, perms, off, dev, ino, path = m.groups()
        out.append((int(s, 16), int(e, 16), perms, int(off, 16), dev, int(ino), path))
    return out


def test_read_maps_and_vmflags_of_this_process(tmp_path: pathlib.Path) -> None:
    """This process's own maps: a file with spaces in its name, mapped shared and private, then deleted."""
    d = tmp_path / "dir with  two spaces"
    d.mkdir()
    f = d / "data file (1).bin"
    f.write_bytes(b"x" * 3 * PAGE)
    st = f.stat()
    with open(f, "r+b") as fh:
        shared = mmap.mmap(fh.fileno(), 2 * PAGE, flags=mmap.MAP_SHARED, offset=0)
        private = mmap.mmap(fh.fileno(), PAGE, flags=mmap.MAP_PRIVATE, offset=2 * PAGE)
    anon = mmap.mmap(-1, 5 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        f.unlink()
        vmas = read_maps(os.getpid())
        with open("/proc/self/maps") as m:
            text = m.read()
        # the layout did not change in between: nothing maps or unmaps here
        assert [tuple(v) for v in vmas] == maps_oracle(text)
        assert all(a.end <= b.start for a, b in zip(vmas, vmas[1:], strict=False))
        mine = [v for v in vmas if v.path == f"{f} (deleted)"]
        assert len(mine) == 2, [str(v) for v in vmas]
        sh, pr = sorted(mine, key=lambda v: v.perms[3] != "s")
        dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
        assert (sh.perms, sh.offset, sh.size, sh.inode, sh.dev) == ("rw-s", 0, 2 * PAGE, st.st_ino, dev)
        assert (pr.perms, pr.offset, pr.size, pr.inode) == ("rw-p", 2 * PAGE, PAGE, st.st_ino)
        assert sh.shared and not pr.shared and not pr.anonymous
        addr = _addr(anon)
        a = next(v for v in vmas if v.start <= addr < v.end)
        assert a.anonymous and a.perms == "rw-p"
        assert any(v.path == "[stack]" and v.anonymous for v in vmas)
        flags = read_vmflags(os.getpid())
        assert set(flags) == {v.start for v in vmas}
        assert {"rd", "wr", "sh", "mr", "mw", "me", "ms"} <= flags[sh.start]
        assert {"rd", "wr"} <= flags[pr.start] and "sh" not in flags[pr.start]
        assert policy_for(sh, flags[sh.start])[0] is Policy.WHOLE
        assert policy_for(pr, flags[pr.start])[0] is Policy.TRACK
        assert policy_for(a, flags[a.start])[0] is Policy.TRACK
    finally:
        shared.close()
        private.close()
        anon.close()


def _addr(m: mmap.mmap) -> int:
    """The address of a mapping made by the mmap module."""
    buf = (ctypes.c_char * 1).from_buffer(m)
    try:
        return ctypes.addressof(buf)
    finally:
        del buf


@pytest.mark.parametrize(("vma", "flags", "policy", "why"), [
    (Vma(0, PAGE, "r--p", 0, "00:00", 0, "[vvar]"), "rd mr pf io de dd", Policy.SKIP, "kernel-provided"),
    (Vma(0, PAGE, "--xp", 0, "00:00", 0, "[vsyscall]"), "ex", Policy.SKIP, "kernel-provided"),
    (Vma(0, PAGE, "rw-s", 0, "00:06", 5, "/dev/mem"), "rd wr sh mr mw me ms io pf dd", Policy.SKIP, "device"),
    (Vma(0, PAGE, "rw-p", 0, "00:06", 5, "/dev/x"), "rd wr mr mw me pf", Policy.SKIP, "device"),
    (Vma(0, PAGE, "rw-s", 0, "00:08", 3, "/secretmem (deleted)"), "rd wr sh mr mw me ms", Policy.SKIP,
     "memfd_secret"),
    (Vma(0, PAGE, "r-xp", 0, "00:00", 0, "[vdso]"), "rd ex mr mw me de", Policy.WHOLE, "[vdso]"),
    (Vma(0, PAGE, "rw-s", 0, "00:01", 9, "/memfd:x (deleted)"), "rd wr sh mr mw me ms", Policy.WHOLE, "shared"),
    (Vma(0, PAGE, "rw-p", 0, "00:00", 0, ""), "rd wr mr mw me ac dp", Policy.WHOLE, "MAP_DROPPABLE"),
    (Vma(0, PAGE, "rw-p", 0, "00:00", 0, "[heap]"), "rd wr mr mw me ac", Policy.TRACK, "tracked"),
    (Vma(0, PAGE, "r--p", 0, "08:01", 9, "/usr/lib/libc.so.6"), "rd mr mw me", Policy.TRACK, "tracked"),
])
def test_policy_for(vma: Vma, flags: str, policy: Policy, why: str) -> None:
    got, reason = policy_for(vma, frozenset(flags.split()))
    assert got is policy and why in reason


# ------------------------------------------------------------------------------------------------ diff_layouts

def V(lo: int, hi: int, perms: str = "rw-p", path: str = "", inode: int = 0, offset: int = 0,
      dev: str = "00:00") -> Vma:
    return Vma(lo * PAGE, hi * PAGE, perms, offset * PAGE, dev, inode, path)


def E(kind: EventKind, old: Vma | None, new: Vma | None) -> VmaEvent:
    return VmaEvent(kind, old, new)


def test_diff_nothing_changed() -> None:
    layout = [V(1, 3), V(3, 4, "r--p"), V(10, 20, path="[heap]")]
    assert diff_layouts(layout, list(layout), set()) == []


def test_diff_appeared_and_vanished() -> None:
    a, b = V(1, 3), V(10, 12)
    assert diff_layouts([a], [a, b], set()) == [E(EventKind.APPEARED, None, b)]
    assert diff_layouts([a], [a, b], {(b.start, b.end)}) == [E(EventKind.APPEARED, None, b)]
    assert diff_layouts([a, b], [a], set()) == [E(EventKind.VANISHED, b, None)]


def test_diff_moved() -> None:
    """mremap to a new place: the created VMA has the vanished one's size, identity and offset."""
    old = V(1, 3, path="/lib/a b.so", inode=7, offset=4)
    new = V(100, 102, path="/lib/a b.so", inode=7, offset=4)
    assert diff_layouts([old], [new], {(new.start, new.end)}) == [E(EventKind.MOVED, old, new)]
    # not created (found registered): an unrelated appearance and a disappearance
    assert diff_layouts([old], [new], set()) == [E(EventKind.APPEARED, None, new), E(EventKind.VANISHED, old, None)]
    other = new._replace(offset=5 * PAGE)  # another part of the file: not the same mapping moved
    assert diff_layouts([old], [other], {(other.start, other.end)}) == [
        E(EventKind.APPEARED, None, other), E(EventKind.VANISHED, old, None)]


def test_diff_grown_in_place_and_beside() -> None:
    heap = V(10, 12, path="[heap]")
    bigger = V(10, 16, path="[heap]")
    assert diff_layouts([heap], [bigger], set()) == [E(EventKind.GROWN, heap, bigger)]
    # brk: a fresh VMA beside the tracked heap, merged with it by the kernel into one maps line
    # (the piece keeps its own offset: anonymous pgoff continues)
    piece = V(12, 16, path="[heap]", offset=2)
    assert diff_layouts([heap], [bigger], {(piece.start, piece.end)}) == [E(EventKind.GROWN, heap, piece)]
    # beside but another mapping: appeared
    lib = V(12, 14, "r--p", "/lib/x.so", 3)
    assert diff_layouts([heap], [heap, lib], {(lib.start, lib.end)}) == [E(EventKind.APPEARED, None, lib)]


def test_diff_shrunk_split_and_protection() -> None:
    o = V(1, 5)
    assert diff_layouts([o], [V(1, 3)], set()) == [E(EventKind.SHRUNK, o, V(1, 3))]
    ro = V(3, 5, "r--p", offset=2)
    assert diff_layouts([o], [V(1, 3), ro], set()) == [
        E(EventKind.SPLIT, o, V(1, 3)), E(EventKind.SPLIT, o, ro), E(EventKind.PROTECTION_CHANGED, o, ro)]
    assert diff_layouts([o], [o._replace(perms="r--p")], set()) == [
        E(EventKind.PROTECTION_CHANGED, o, o._replace(perms="r--p"))]


def test_diff_replaced_and_merged() -> None:
    o = V(1, 5)
    b = V(1, 5, "rw-s", "/dev/shm/x", 9)
    assert diff_layouts([o], [b], {(b.start, b.end)}) == [E(EventKind.REPLACED, o, b)]
    a1, a2 = V(1, 3), V(3, 5, "r--p", offset=2)
    m = V(1, 5)
    assert diff_layouts([a1, a2], [m], set()) == [
        E(EventKind.MERGED, a1, m), E(EventKind.MERGED, a2, m), E(EventKind.PROTECTION_CHANGED, a2, m)]


# random layouts: properties of every diff

IDS = [("00:00", 0, ""), ("00:00", 0, "[heap]"), ("08:01", 77, "/lib/x y.so"), ("00:01", 9, "/memfd:m (deleted)")]
PERMS = ["rw-p", "r--p", "r-xp", "rw-s"]


def _rand_vma(rng: random.Random, lo: int, hi: int) -> Vma:
    dev, inode, path = rng.choice(IDS)
    return Vma(lo * PAGE, hi * PAGE, rng.choice(PERMS), rng.choice((0, lo, 3)) * PAGE, dev, inode, path)


def _random_pair(rng: random.Random) -> tuple[list[Vma], list[Vma], set[tuple[int, int]]]:
    pages = rng.randint(4, 40)
    old, p = [], 0
    while True:
        p += rng.choice((0, 0, 1, 3))
        n = rng.randint(1, 5)
        if p + n > pages:
            break
        old.append(_rand_vma(rng, p, p + n))
        p += n
    new: list[Vma] = []
    fresh: set[tuple[int, int]] = set()
    for o in old:
        lo, hi, r = o.start // PAGE, o.end // PAGE, rng.random()
        if r < 0.4:
            new.append(o)
        elif r < 0.5:
            new.append(o._replace(perms=rng.choice(PERMS)))
        elif r < 0.6 and hi - lo > 1:
            m = rng.randint(lo + 1, hi - 1)
            new += [o._replace(end=m * PAGE), o._replace(start=m * PAGE, offset=o.offset + (m - lo) * PAGE,
                                                         perms=rng.choice(PERMS))]
        elif r < 0.7:
            new.append(o._replace(end=o.end + rng.randint(1, 3) * PAGE))
        elif r < 0.8:  # moved far away
            at = pages + rng.randint(0, 3 * pages)
            v = o._replace(start=at * PAGE, end=at * PAGE + o.size)
            new.append(v)
            fresh.add((v.start, v.end))
        elif r < 0.9:  # replaced in place
            v = _rand_vma(rng, lo, hi)
            new.append(v)
            fresh.add((v.start, v.end))
        # else unmapped
    for _ in range(rng.randint(0, 3)):
        at = rng.randint(0, 4 * pages)
        v = _rand_vma(rng, at, at + rng.randint(1, 4))
        new.append(v)
        if rng.random() < 0.5:
            fresh.add((v.start, v.end))
    new.sort(key=lambda v: v.start)
    disjoint: list[Vma] = []
    for v in new:
        if not disjoint or disjoint[-1].end <= v.start:
            disjoint.append(v)
    # fresh spans are those of VMAs in the new layout (tests/test_many_vmas.py covers stale ones)
    return old, disjoint, fresh & {(v.start, v.end) for v in disjoint}


def _meets(a: Vma, b: Vma) -> bool:
    return a.start < b.end and b.start < a.end


def test_diff_random_layouts_account_for_every_change() -> None:
    rng = random.Random(41)
    seen: set[EventKind] = set()
    for _ in range(3000):
        old, new, fresh = _random_pair(rng)
        events = diff_layouts(old, new, fresh)
        seen |= {e.kind for e in events}
        ctx = (old, new, fresh, events)
        unchanged = {v for v in new if v in set(old) and (v.start, v.end) not in fresh}
        olds = [e.old for e in events if e.old is not None]
        news = [e.new for e in events if e.new is not None]
        # nothing unchanged is reported (but as the VMA a new one grew beside); every event's VMAs come from the
        # two layouts
        assert not unchanged & set(news), ctx
        assert all(e.kind is EventKind.GROWN and e.old.end == e.new.start for e in events if e.old in unchanged), ctx
        assert set(olds) <= set(old), ctx
        new_cover = {a for v in new for a in range(v.start, v.end, PAGE)}
        assert all({a for a in range(v.start, v.end, PAGE)} <= new_cover for v in news), ctx
        # every old VMA not kept is accounted for; every new page not kept is reported by some event
        for o in old:
            if o not in unchanged and o not in olds:
                # the exception: a new VMA meeting several old ones and more (GROWN), or created over several
                # (REPLACED), names only the first of them
                assert any(e.kind in (EventKind.GROWN, EventKind.REPLACED) and _meets(o, e.new) and e.old != o
                           for e in events), (o, ctx)
        kept = {a for v in unchanged for a in range(v.start, v.end, PAGE)}
        assert new_cover - kept <= {a for v in news for a in range(v.start, v.end, PAGE)}, ctx
        for e in events:
            if e.kind is EventKind.VANISHED:
                assert e.new is None and not any(_meets(e.old, v) for v in new), ctx
                assert sum(1 for x in events if x.old == e.old) == 1, ctx  # nothing else said about it
            elif e.kind is EventKind.APPEARED:
                assert e.old is None and not any(_meets(e.new, o) for o in old), ctx
            elif e.kind is EventKind.MOVED:
                o, v = e.old, e.new
                assert (o.size, o.identity, o.offset) == (v.size, v.identity, v.offset), ctx
                assert (v.start, v.end) in fresh and not any(_meets(v, x) for x in old), ctx
                assert not any(_meets(o, x) for x in new), ctx
            elif e.kind is EventKind.GROWN:
                assert e.new.size > 0 and (_meets(e.old, e.new) or e.old.end == e.new.start), ctx
            elif e.kind in (EventKind.SHRUNK, EventKind.SPLIT):
                assert e.old.start <= e.new.start and e.new.end <= e.old.end and e.new != e.old, ctx
            elif e.kind is EventKind.PROTECTION_CHANGED:
                assert _meets(e.old, e.new) and (e.old.perms != e.new.perms or
                                                 (e.old.start, e.old.end) == (e.new.start, e.new.end)), ctx
            elif e.kind is EventKind.MERGED:
                # (also said of a new VMA meeting parts of several old ones, not exactly their span)
                assert _meets(e.old, e.new) and sum(1 for o in old if _meets(o, e.new)) > 1, ctx
            elif e.kind is EventKind.REPLACED:
                assert (e.new.start, e.new.end) in fresh and _meets(e.old, e.new), ctx
        # moved VMAs are matched at most once; a VMA that vanished was not also moved
        moved = [e.old for e in events if e.kind is EventKind.MOVED]
        assert len(moved) == len(set(moved)), ctx
    assert seen == set(EventKind), seen  # every kind of event was checked
