"""wpdump.ranges against a brute-force model: a range list is the set of units it covers. Random inputs
(overlapping, touching, unsorted), then the same inputs moved near the top of the u64 address space."""

from __future__ import annotations

import numpy as np
import pytest
from wpdump import ranges
from wpdump.target import memory as pagecopy

SPAN = 96  # units of the model's universe
HIGH = (1 << 64) - (1 << 20)  # a base near the top of the u64 space: no op may go through int64/float


def R(pairs) -> np.ndarray:
    return np.array(pairs, dtype=np.uint64).reshape(-1, 2)


def cover(r: np.ndarray) -> set[int]:
    return {u for s, e in r.tolist() for u in range(s, e)}


def canonical(cells: set[int]) -> list[tuple[int, int]]:
    """The sorted, merged ranges of a set of units (the form merge/subtract/intersect/union return)."""
    out: list[tuple[int, int]] = []
    for u in sorted(cells):
        if out and out[-1][1] == u:
            out[-1] = (out[-1][0], u + 1)
        else:
            out.append((u, u + 1))
    return out


def as_list(r: np.ndarray) -> list[tuple[int, int]]:
    assert r.dtype == np.uint64 and r.ndim == 2 and r.shape[1] == 2, (r.dtype, r.shape)
    return [tuple(p) for p in r.tolist()]


def random_ranges(rng: np.random.Generator, sorted_disjoint: bool = False) -> np.ndarray:
    """0 to 8 non-empty ranges in [0, SPAN): overlapping, touching and unsorted unless ``sorted_disjoint``."""
    n = int(rng.integers(0, 9))
    if sorted_disjoint:
        cuts = np.sort(rng.choice(SPAN + 1, size=2 * n, replace=False))
        return R(cuts.reshape(-1, 2)) if n else ranges.EMPTY.copy()
    starts = rng.integers(0, SPAN - 1, n)
    ends = starts + rng.integers(1, 20, n)
    return R(np.column_stack((starts, np.minimum(ends, SPAN))))


def shift(r: np.ndarray) -> np.ndarray:
    return (r + np.uint64(HIGH)).astype(np.uint64) if len(r) else r


def unshift(r: np.ndarray) -> np.ndarray:
    return (r - np.uint64(HIGH)).astype(np.uint64) if len(r) else r


CASES = 400


@pytest.mark.parametrize("high", [False, True], ids=["low", "near-2^64"])
def test_merge_union_subtract_intersect_against_sets(high: bool) -> None:
    rng = np.random.default_rng(11)
    mv, back = (shift, unshift) if high else (lambda r: r, lambda r: r)
    for _ in range(CASES):
        a, b, c = random_ranges(rng), random_ranges(rng), random_ranges(rng)
        A, B, C = cover(a), cover(b), cover(c)
        assert as_list(back(ranges.merge(mv(a)))) == canonical(A), a
        assert as_list(back(ranges.union(mv(a), mv(b), mv(c)))) == canonical(A | B | C), (a, b, c)
        assert as_list(back(ranges.intersect(mv(a), mv(b)))) == canonical(A & B), (a, b)
        sub = back(ranges.subtract(mv(a), mv(b)))
        assert cover(sub) == A - B, (a, b)
        if len(b):  # with nothing to subtract, ``a`` comes back as it was (merged or not)
            assert as_list(sub) == canonical(A - B), (a, b)


def touching(rng: np.random.Generator) -> np.ndarray:
    """Sorted, disjoint ranges some of which touch (end == next start): what the native pass takes."""
    r = random_ranges(rng, sorted_disjoint=True)
    if len(r) > 1:
        glue = rng.random(len(r) - 1) < 0.4
        r[1:, 0] = np.where(glue, r[:-1, 1], r[1:, 0])
    return r


@pytest.mark.parametrize("high", [False, True], ids=["low", "near-2^64"])
def test_native_pass_of_sorted_disjoint_ranges_against_sets(high: bool) -> None:
    """subtract / intersect / union of sorted, disjoint (touching) inputs take the linear native pass: the same
    merged result as the sets say."""
    rng = np.random.default_rng(13)
    mv, back = (shift, unshift) if high else (lambda r: r, lambda r: r)
    for _ in range(4 * CASES):
        a, b, c = touching(rng), touching(rng), touching(rng)
        assert ranges._ordered(a) and ranges._ordered(b)
        A, B, C = cover(a), cover(b), cover(c)
        assert as_list(back(ranges.intersect(mv(a), mv(b)))) == canonical(A & B), (a, b)
        assert as_list(back(ranges.union(mv(a), mv(b), mv(c)))) == canonical(A | B | C), (a, b, c)
        if len(b):
            assert as_list(back(ranges.subtract(mv(a), mv(b)))) == canonical(A - B), (a, b)


def test_subtract_of_merged_input_is_merged() -> None:
    rng = np.random.default_rng(12)
    for _ in range(CASES):
        a, b = random_ranges(rng, sorted_disjoint=True), random_ranges(rng)
        assert as_list(ranges.subtract(ranges.merge(a), b)) == canonical(cover(a) - cover(b))


def test_merge_touching_nested_and_duplicates() -> None:
    r = R([(10, 20), (0, 5), (5, 7), (12, 15), (10, 20), (30, 31), (20, 22)])
    assert as_list(ranges.merge(r)) == [(0, 7), (10, 22), (30, 31)]
    one = R([(3, 4)])
    assert as_list(ranges.merge(one)) == [(3, 4)]
    assert ranges.merge(ranges.EMPTY).shape == (0, 2)


def test_union_and_intersect_of_nothing() -> None:
    assert ranges.union().shape == (0, 2)
    assert ranges.union(ranges.EMPTY, ranges.EMPTY).shape == (0, 2)
    assert as_list(ranges.union(R([(4, 8)]), ranges.EMPTY)) == [(4, 8)]
    assert ranges.intersect(R([(0, 8)]), ranges.EMPTY).shape == (0, 2)
    assert ranges.intersect(ranges.EMPTY, R([(0, 8)])).shape == (0, 2)
    assert as_list(ranges.subtract(R([(0, 8)]), R([(0, 8)]))) == []
    assert as_list(ranges.subtract(R([(0, 8)]), R([(2, 3), (5, 6)]))) == [(0, 2), (3, 5), (6, 8)]


@pytest.mark.parametrize("high", [False, True], ids=["low", "near-2^64"])
def test_clip_is_row_by_row_and_clip_sorted_agrees(high: bool) -> None:
    rng = np.random.default_rng(13)
    base = HIGH if high else 0
    for _ in range(CASES):
        r = random_ranges(rng)
        lo = int(rng.integers(0, SPAN))
        hi = int(rng.integers(lo, SPAN + 1))
        want = [(max(s, lo), min(e, hi)) for s, e in r.tolist() if max(s, lo) < min(e, hi)]
        got = ranges.clip(shift(r) if high else r, lo + base, hi + base)
        assert as_list(unshift(got) if high else got) == want, (r, lo, hi)
        d = random_ranges(rng, sorted_disjoint=True)
        want_d = [(max(s, lo), min(e, hi)) for s, e in d.tolist() if max(s, lo) < min(e, hi)]
        got_d = ranges.clip_sorted(shift(d) if high else d, lo + base, hi + base)
        assert as_list(unshift(got_d) if high else got_d) == want_d, (d, lo, hi)


def test_clip_sorted_many_ranges_binary_search_edges() -> None:
    d = R([(i * 10, i * 10 + 5) for i in range(1000)])
    for lo, hi in [(0, 10_000), (5, 10), (4, 11), (9_995, 20_000), (10_000, 20_000), (7, 7), (0, 1), (3_003, 3_004)]:
        want = [(max(s, lo), min(e, hi)) for s, e in d.tolist() if max(s, lo) < min(e, hi)]
        assert as_list(ranges.clip_sorted(d, lo, hi)) == want, (lo, hi)
        assert as_list(ranges.clip(d, lo, hi)) == want, (lo, hi)


def test_overlaps_against_sets() -> None:
    rng = np.random.default_rng(14)
    for _ in range(CASES):
        q, r = random_ranges(rng), random_ranges(rng)
        want = [bool(cover(R([row])) & cover(r)) for row in q.tolist()]
        got = ranges.overlaps(q, r)
        assert got.dtype == bool and got.tolist() == want, (q, r)
        assert ranges.overlaps(shift(q), shift(r)).tolist() == want, (q, r)


def test_overlaps_touching_is_not_overlapping() -> None:
    r = R([(10, 20)])
    q = R([(0, 10), (20, 30), (0, 11), (19, 30), (12, 13), (0, 100)])
    assert ranges.overlaps(q, r).tolist() == [False, False, True, True, True, True]
    assert ranges.overlaps(q, ranges.EMPTY).tolist() == [False] * 6
    assert ranges.overlaps(ranges.EMPTY, r).tolist() == []


def test_total_pages_from_pairs() -> None:
    rng = np.random.default_rng(15)
    for _ in range(100):
        d = random_ranges(rng, sorted_disjoint=True) * np.uint64(4096)
        assert ranges.total(d) == 4096 * len(cover(d // np.uint64(4096)))
        want = sorted(4096 * u for u in cover(d // np.uint64(4096)))
        got = ranges.page_addrs(d)
        assert got.dtype == np.uint64 and got.tolist() == want
    assert ranges.total(ranges.EMPTY) == 0
    assert ranges.page_addrs(ranges.EMPTY).tolist() == []
    top = R([(HIGH, HIGH + 2 * 4096)])
    assert ranges.total(top) == 8192 and ranges.page_addrs(top).tolist() == [HIGH, HIGH + 4096]
    e = ranges.from_pairs([])
    assert e.shape == (0, 2) and e.dtype == np.uint64 and e is not ranges.EMPTY
    assert as_list(ranges.from_pairs([(1, 2), (HIGH, HIGH + 1)])) == [(1, 2), (HIGH, HIGH + 1)]


# page/range conversions (the batches a copy is split into)

def test_page_addrs_runs_and_in_ranges() -> None:
    rng = np.random.default_rng(16)
    for _ in range(CASES):
        d = random_ranges(rng, sorted_disjoint=True) * np.uint64(4096) + np.uint64(HIGH - (1 << 19))
        want = [4096 * u for u in sorted(cover(d // np.uint64(4096)))]
        addrs = ranges.page_addrs(d)
        assert addrs.dtype == np.uint64 and addrs.tolist() == want
        assert as_list(ranges.from_pages(addrs)) == as_list(ranges.merge(d))
        probe = np.sort(rng.integers(int(d.min()) - 8192, int(d.max()) + 8192, 50, dtype=np.uint64)) if len(d) else \
            np.zeros(0, dtype=np.uint64)
        assert ranges.in_ranges(probe, ranges.merge(d)).tolist() == [
            any(s <= int(a) < e for s, e in d.tolist()) for a in probe]
    # page_addrs keeps the order of unsorted ranges
    assert ranges.page_addrs(R([(8192, 16384), (0, 4096)])).tolist() == [8192, 12288, 0]
    assert ranges.from_pages(np.zeros(0, dtype=np.uint64)).shape == (0, 2)


def test_runs_of() -> None:
    rng = np.random.default_rng(17)
    P = 4096
    for _ in range(CASES):
        addrs = np.sort(rng.choice(64, size=int(rng.integers(0, 40)), replace=False)).astype(np.uint64) * np.uint64(P)
        sel = rng.random(len(addrs)) < 0.7
        got_r, got_i = pagecopy._runs_of(addrs, sel)
        runs_want: list[tuple[int, int, int]] = []  # (start, end, index of the first page in addrs)
        for i, (a, s) in enumerate(zip(addrs.tolist(), sel.tolist(), strict=True)):
            if not s:
                continue
            if runs_want and runs_want[-1][1] == a and sel[i - 1]:
                runs_want[-1] = (runs_want[-1][0], a + P, runs_want[-1][2])
            else:
                runs_want.append((a, a + P, i))
        assert [(s, e, i) for (s, e), i in zip(got_r.tolist(), got_i.tolist(), strict=True)] == runs_want
