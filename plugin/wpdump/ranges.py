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


def total(r: np.ndarray) -> int:
    """Bytes covered by ``r``."""
    return int((r[:, 1] - r[:, 0]).sum()) if len(r) else 0


def pages(r: np.ndarray, page_size: int = 4096) -> np.ndarray:
    """Every page address covered by ``r`` (for tests and small sets only)."""
    if not len(r):
        return np.zeros(0, dtype=np.uint64)
    return np.concatenate([np.arange(int(a), int(b), page_size, dtype=np.uint64) for a, b in r])


def subtract(a: np.ndarray, b: np.ndarray, page_size: int = 4096) -> np.ndarray:
    """Ranges of ``a`` not covered by ``b`` (page granular)."""
    if not len(a) or not len(b):
        return a
    lo, hi = int(a[:, 0].min()), int(a[:, 1].max())
    mask = np.zeros((hi - lo) // page_size, dtype=bool)
    for s, e in a:
        mask[(int(s) - lo) // page_size : (int(e) - lo) // page_size] = True
    for s, e in clip(b, lo, hi):
        mask[(int(s) - lo) // page_size : (int(e) - lo) // page_size] = False
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.view(np.int8), [0]))))
    out = (edges.reshape(-1, 2) * page_size + lo).astype(np.uint64)
    return out
