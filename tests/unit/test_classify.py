"""tracker.classify / classify_many on hand-made PAGEMAP_SCAN regions (uffd.REGION_DTYPE), against a page by
page model written from docs/kernel.md "Classifying a page reported WRITTEN"."""

from __future__ import annotations

import numpy as np
import pytest
from wpdump.target import uffd
from wpdump.target.uffd import (
    PAGE_IS_FILE,
    PAGE_IS_GUARD,
    PAGE_IS_HUGE,
    PAGE_IS_PFNZERO,
    PAGE_IS_PRESENT,
    PAGE_IS_SWAPPED,
    PAGE_IS_WRITTEN,
)
from wpdump.target.vmas import Policy, Vma
from wpdump.tracking.tracker import classify, classify_many

PAGE = 4096
BASE = 0x7F00_0000_0000

ANON = ("rw-p", "00:00", 0, "")
HEAP = ("rw-p", "00:00", 0, "[heap]")
STACK = ("rw-p", "00:00", 0, "[stack]")
SHARED_FILE = ("rw-s", "00:1f", 41, "/dev/shm/seg one")
SHARED_ANON = ("rw-s", "00:01", 1025, "/dev/zero (deleted)")
PRIVATE_FILE = ("rw-p", "08:01", 77, "/usr/lib/x86_64-linux-gnu/libc.so.6")
PRIVATE_NOINODE = ("rw-p", "00:00", 0, "/memfd:odd (deleted)")  # a path, no inode: not anonymous, not file
KINDS = [ANON, HEAP, STACK, SHARED_FILE, SHARED_ANON, PRIVATE_FILE, PRIVATE_NOINODE]

W = PAGE_IS_WRITTEN
CATS = [
    W, W | PAGE_IS_PRESENT, W | PAGE_IS_SWAPPED, W | PAGE_IS_PRESENT | PAGE_IS_PFNZERO,
    W | PAGE_IS_PRESENT | PAGE_IS_FILE, W | PAGE_IS_FILE, W | PAGE_IS_SWAPPED | PAGE_IS_FILE,
    W | PAGE_IS_PRESENT | PAGE_IS_FILE | PAGE_IS_PFNZERO, W | PAGE_IS_GUARD, W | PAGE_IS_GUARD | PAGE_IS_SWAPPED,
    W | PAGE_IS_PRESENT | PAGE_IS_HUGE, W | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO,
]


def vma(kind: tuple, lo: int, pages: int) -> Vma:
    perms, dev, inode, path = kind
    return Vma(lo, lo + pages * PAGE, perms, 0, dev, inode, path)


def expected(v: Vma, cat: int) -> str:
    """Where one written page goes, the rule spelled out per kind of VMA (docs/kernel.md)."""
    if cat & PAGE_IS_GUARD:
        return "guard"
    has_data = bool(cat & (PAGE_IS_PRESENT | PAGE_IS_SWAPPED))
    if has_data and cat & PAGE_IS_PFNZERO:
        return "zero"  # the shared zero page: nothing to copy
    if v.perms[3] == "s":
        return "copy"  # present, swapped or not: the content lives in the shared object
    if v.inode == 0 and not v.path.startswith("/"):
        return "copy" if has_data else "zero"  # anonymous: a zapped page reads as zero
    # private mapping of a file (or of something with a path)
    if has_data:
        # a present page-cache page is the file's own content; a swapped or anonymous (COWed) page is ours
        return "reverted" if cat & PAGE_IS_FILE and cat & PAGE_IS_PRESENT else "copy"
    return "reverted" if cat & PAGE_IS_FILE or v.inode else "zero"


def page_sets(vp) -> dict[str, set[int]]:
    out = {}
    for name in ("copy", "zero", "reverted", "guard"):
        r = getattr(vp, name)
        assert r.ndim == 2 and r.shape[1] == 2 and r.dtype == np.uint64, (name, r.dtype, r.shape)
        starts, ends = r[:, 0].tolist(), r[:, 1].tolist()
        assert all(s < e for s, e in zip(starts, ends, strict=True)), (name, r)
        # coalesced: sorted, disjoint, touching ranges merged
        assert all(e < s for e, s in zip(ends, starts[1:], strict=False)), (name, r)
        out[name] = {a for s, e in zip(starts, ends, strict=True) for a in range(s, e, PAGE)}
    return out


def model(v: Vma, regions: np.ndarray) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {"copy": set(), "zero": set(), "reverted": set(), "guard": set()}
    for s, e, cat in regions.tolist():
        out[expected(v, cat)].update(range(s, e, PAGE))
    return out


def regions_of(rows: list[tuple[int, int, int]]) -> np.ndarray:
    return np.array(rows, dtype=uffd.REGION_DTYPE)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k[3] or "anon")
def test_each_category_in_each_kind_of_vma(kind: tuple) -> None:
    """One page of every category combination in a VMA of each kind."""
    v = vma(kind, BASE, len(CATS) + 2)
    regs = regions_of([(BASE + i * PAGE, BASE + (i + 1) * PAGE, c) for i, c in enumerate(CATS)])
    got = classify(v, regs, Policy.TRACK, False)
    assert (got.vma, got.policy, got.whole) == (v, Policy.TRACK, False)
    assert page_sets(got) == model(v, regs)


def test_worked_examples() -> None:
    """The rule on a few regions, expectations written out by hand."""
    a = BASE
    regs = regions_of([
        (a, a + 3 * PAGE, W | PAGE_IS_PRESENT),  # dirty
        (a + 3 * PAGE, a + 4 * PAGE, W),  # zapped (MADV_DONTNEED)
        (a + 4 * PAGE, a + 6 * PAGE, W | PAGE_IS_SWAPPED),  # dirty, swapped out
        (a + 6 * PAGE, a + 7 * PAGE, W | PAGE_IS_PRESENT | PAGE_IS_PFNZERO),  # zero page
        (a + 8 * PAGE, a + 9 * PAGE, W | PAGE_IS_GUARD),  # MADV_GUARD_INSTALL
    ])
    anon = classify(vma(ANON, a, 10), regs, Policy.TRACK, True)
    assert anon.copy.tolist() == [[a, a + 3 * PAGE], [a + 4 * PAGE, a + 6 * PAGE]]
    assert anon.zero.tolist() == [[a + 3 * PAGE, a + 4 * PAGE], [a + 6 * PAGE, a + 7 * PAGE]]
    assert anon.reverted.tolist() == [] and anon.guard.tolist() == [[a + 8 * PAGE, a + 9 * PAGE]]
    assert anon.whole and anon.copy_bytes == 5 * PAGE
    shared = classify(vma(SHARED_FILE, a, 10), regs, Policy.WHOLE, False)
    assert shared.copy.tolist() == [[a, a + 6 * PAGE]]  # the zapped page is read from the object
    assert shared.zero.tolist() == [[a + 6 * PAGE, a + 7 * PAGE]]
    private = classify(vma(PRIVATE_FILE, a, 10), regs, Policy.TRACK, False)
    assert private.copy.tolist() == [[a, a + 3 * PAGE], [a + 4 * PAGE, a + 6 * PAGE]]
    assert private.reverted.tolist() == [[a + 3 * PAGE, a + 4 * PAGE]]  # back to the file's content
    assert private.zero.tolist() == [[a + 6 * PAGE, a + 7 * PAGE]]


def test_empty_regions() -> None:
    got = classify(vma(ANON, BASE, 4), regions_of([]), Policy.TRACK, False)
    assert all(len(getattr(got, f)) == 0 for f in ("copy", "zero", "reverted", "guard"))
    vs = [vma(ANON, BASE, 4), vma(SHARED_FILE, BASE + 4 * PAGE, 4)]
    many = classify_many(vs, regions_of([]), np.array([0, 0]), Policy.TRACK)
    assert [m.vma for m in many] == vs
    assert all(len(getattr(m, f)) == 0 for m in many for f in ("copy", "zero", "reverted", "guard"))


def random_layout(rng: np.random.Generator, adjacent_regions: bool):
    """VMAs of random kinds (touching or not) with random regions in address order; with
    ``adjacent_regions`` regions of neighbouring pages often share a category (to be coalesced)."""
    vmas, rows, counts, p = [], [], [], BASE
    for _ in range(int(rng.integers(1, 25))):
        n = int(rng.integers(1, 12))
        v = vma(KINDS[int(rng.integers(len(KINDS)))], p, n)
        k, i, cat = 0, 0, int(CATS[0])
        while i < n:
            if rng.random() < 0.4:
                i += 1
                continue
            ln = int(rng.integers(1, n - i + 1))
            if not adjacent_regions or rng.random() < 0.5:
                cat = int(CATS[int(rng.integers(len(CATS)))])
            rows.append((p + i * PAGE, p + (i + ln) * PAGE, cat))
            k += 1
            i += ln
        vmas.append(v)
        counts.append(k)
        p = v.end if rng.random() < 0.6 else v.end + int(rng.integers(1, 4)) * PAGE
    return vmas, regions_of(rows), counts


@pytest.mark.parametrize("adjacent", [False, True])
def test_classify_random_against_model(adjacent: bool) -> None:
    rng = np.random.default_rng(21 + adjacent)
    for _ in range(150):
        vmas, regs, counts = random_layout(rng, adjacent)
        ends = np.cumsum(counts).tolist()
        for v, c, e in zip(vmas, counts, ends, strict=True):
            mine = regs[e - c : e]
            assert page_sets(classify(v, mine, Policy.TRACK, False)) == model(v, mine), (v, mine)


@pytest.mark.parametrize("adjacent", [False, True])
def test_classify_many_against_model_and_classify(adjacent: bool) -> None:
    rng = np.random.default_rng(31 + adjacent)
    for _ in range(150):
        vmas, regs, counts = random_layout(rng, adjacent)
        whole = bool(rng.integers(2))
        got = classify_many(vmas, regs, np.array(counts), Policy.WHOLE, whole)
        assert len(got) == len(vmas)
        ends = np.cumsum(counts).tolist()
        for v, g, c, e in zip(vmas, got, counts, ends, strict=True):
            mine = regs[e - c : e]
            assert (g.vma, g.policy, g.whole) == (v, Policy.WHOLE, whole)
            sets = page_sets(g)
            assert sets == model(v, mine), (v, mine)
            # nothing leaks across VMAs: every range lies inside its own VMA
            assert all(v.start <= a < v.end for s in sets.values() for a in s)
            one = classify(v, mine, Policy.WHOLE, whole)
            for f in ("copy", "zero", "reverted", "guard"):
                assert getattr(g, f).reshape(-1, 2).tolist() == getattr(one, f).reshape(-1, 2).tolist(), f


def test_classify_many_never_merges_across_touching_vmas() -> None:
    """Two touching anonymous VMAs, each fully dirty: two copy ranges, one per VMA, not one across both."""
    a, b = vma(ANON, BASE, 2), vma(HEAP, BASE + 2 * PAGE, 2)
    regs = regions_of([(BASE, BASE + 2 * PAGE, W | PAGE_IS_PRESENT), (BASE + 2 * PAGE, BASE + 4 * PAGE,
                                                                       W | PAGE_IS_PRESENT)])
    ga, gb = classify_many([a, b], regs, np.array([1, 1]), Policy.TRACK)
    assert ga.copy.tolist() == [[BASE, BASE + 2 * PAGE]]
    assert gb.copy.tolist() == [[BASE + 2 * PAGE, BASE + 4 * PAGE]]


def test_classify_many_unsorted_regions_fall_back_to_classify() -> None:
    """Regions not in address order (which PAGEMAP_SCAN never returns) still classify correctly."""
    v = vma(ANON, BASE, 8)
    regs = regions_of([(BASE + 4 * PAGE, BASE + 6 * PAGE, W | PAGE_IS_PRESENT), (BASE, BASE + 2 * PAGE, W),
                       (BASE + 5 * PAGE, BASE + 8 * PAGE, W | PAGE_IS_PRESENT)])
    (g,) = classify_many([v], regs, np.array([3]), Policy.TRACK)
    assert g.copy.tolist() == [[BASE + 4 * PAGE, BASE + 8 * PAGE]]
    assert g.zero.tolist() == [[BASE, BASE + 2 * PAGE]]
