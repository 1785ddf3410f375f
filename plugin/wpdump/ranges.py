"""Page ranges as n×2 uint64 numpy arrays of [start, end): no Python object per range."""

from __future__ import annotations

import numpy as np

EMPTY = np.zeros((0, 2), dtype=np.uint64)


def from_pairs(pairs: list[tuple[int, int]]) -> np.ndarray:
    """An n×2 array from a list of (start, end)."""
    return np.array(pairs, dtype=np.uint64).reshape(-1, 2) if pairs else EMPTY.copy()


def merge(r: np.ndarray) -> np.ndarray:
    """Sort and merge overlapping or touching ranges."""
    if len(r) <= 1:
        return r
    if not (r[1:, 0] >= r[:-1, 0]).all():  # most callers pass sorted ranges: skip the sort
        r = r[np.argsort(r[:, 0], kind="stable")]
    ends = np.maximum.accumulate(r[:, 1])
    starts_new = np.ones(len(r), dtype=bool)
    starts_new[1:] = r[1:, 0] > ends[:-1]
    idx = np.flatnonzero(starts_new)
    out = np.empty((len(idx), 2), dtype=np.uint64)
    out[:, 0] = r[idx, 0]
    out[:, 1] = np.maximum.reduceat(r[:, 1], idx)
    return out


def clip(r: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The parts of ``r`` inside [lo, hi)."""
    if not len(r):
        return r
    out = np.column_stack((np.maximum(r[:, 0], lo), np.minimum(r[:, 1], hi))).astype(np.uint64)
    return out[out[:, 0] < out[:, 1]]


def clip_sorted(r: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """:func:`clip` for ``r`` sorted and disjoint, in O(log n + k): the ranges meeting [lo, hi) found by binary
    search (clipping a long list to each of many VMAs is then not quadratic)."""
    if not len(r):
        return r
    i = int(np.searchsorted(r[:, 1], np.uint64(lo), side="right"))  # the first range ending after lo
    j = int(np.searchsorted(r[:, 0], np.uint64(hi), side="left"))  # the first range starting at or after hi
    return clip(r[i:j], lo, hi) if i < j else EMPTY


def total(r: np.ndarray) -> int:
    """Bytes covered by ``r``."""
    return int((r[:, 1] - r[:, 0]).sum()) if len(r) else 0


def pages(r: np.ndarray, page_size: int = 4096) -> np.ndarray:
    """Every page address covered by ``r`` (for tests and small sets only)."""
    if not len(r):
        return np.zeros(0, dtype=np.uint64)
    return np.concatenate([np.arange(int(a), int(b), page_size, dtype=np.uint64) for a, b in r])


def _sweep(a: np.ndarray, b: np.ndarray, want_b: bool) -> np.ndarray:
    """Ranges covered by ``a`` and (``want_b``) or not (not ``want_b``) by ``b``: one sort of the boundaries,
    coverage counts by cumulative sums, no per-range Python work."""
    one_a, one_b = np.ones(len(a), dtype=np.int64), np.ones(len(b), dtype=np.int64)
    pts = np.concatenate((a[:, 0], a[:, 1], b[:, 0], b[:, 1])).astype(np.uint64)
    da = np.concatenate((one_a, -one_a, 0 * one_b, 0 * one_b))
    db = np.concatenate((0 * one_a, 0 * one_a, one_b, -one_b))
    order = np.argsort(pts, kind="stable")
    p = pts[order]
    ca, cb = np.cumsum(da[order]), np.cumsum(db[order])
    last = np.flatnonzero(p[1:] != p[:-1])  # the last event at each position but the final one
    keep = (ca[last] > 0) & ((cb[last] > 0) if want_b else (cb[last] == 0))
    idx = last[keep]
    if not len(idx):
        return EMPTY.copy()
    return merge(np.column_stack((p[idx], p[idx + 1])))


def subtract(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Ranges of ``a`` not covered by ``b`` (a sweep over the boundaries: cost independent of span)."""
    if not len(a) or not len(b):
        return a
    return _sweep(a, b, want_b=False)


def intersect(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Ranges covered by both ``a`` and ``b``."""
    if not len(a) or not len(b):
        return EMPTY.copy()
    return _sweep(a, b, want_b=True)


def union(*parts: np.ndarray) -> np.ndarray:
    """Sorted, merged union of range arrays."""
    parts = tuple(p for p in parts if len(p))
    return merge(np.concatenate(parts).astype(np.uint64)) if parts else EMPTY.copy()


def overlaps(q: np.ndarray, r: np.ndarray) -> np.ndarray:
    """A bool per range of ``q``: does it meet any range of ``r``? (binary search: O((n + m) log m))."""
    if not len(q) or not len(r):
        return np.zeros(len(q), dtype=bool)
    r = merge(np.asarray(r, dtype=np.uint64))
    q = np.asarray(q, dtype=np.uint64)
    i = np.searchsorted(r[:, 1], q[:, 0], side="right")  # the first range of r ending after q's start
    hit = i < len(r)
    hit[hit] = r[i[hit], 0] < q[hit, 1]
    return hit
