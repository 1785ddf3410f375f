"""tracker._pieces / _join_pieces: a scan of the tracked VMAs cut into aligned pieces (pause windows) gives the
regions, counts and errors of one call per VMA."""

from __future__ import annotations

import errno

import numpy as np
from wpdump.target.uffd import REGION_DTYPE
from wpdump.tracking.tracker import _join_pieces, _pieces

PAGE = 4096
PIECE = 16 * PAGE


def test_pieces_cover_each_span_and_cut_only_split_ones_at_aligned_boundaries():
    rng = np.random.default_rng(5)
    lo = np.cumsum(rng.integers(1, 200, 300)) * PAGE
    spans = np.column_stack((lo, lo + rng.integers(1, 100, 300) * PAGE)).astype(np.uint64)
    spans = spans[np.concatenate(([True], spans[1:, 0] >= spans[:-1, 1]))]  # disjoint, in order
    split = rng.random(len(spans)) < 0.7
    pieces, owner = _pieces(spans, split, PIECE)
    assert (np.diff(owner) >= 0).all() and set(owner.tolist()) == set(range(len(spans)))
    for i, (s, e) in enumerate(spans.tolist()):
        mine = pieces[owner == i].tolist()
        assert mine[0][0] == s and mine[-1][1] == e
        assert all(a[1] == b[0] for a, b in zip(mine[:-1], mine[1:], strict=True))  # back to back
        if not split[i]:
            assert mine == [[s, e]]
        else:
            assert all(a // PIECE == (b - 1) // PIECE for a, b in mine)  # none crosses an aligned boundary
            assert len(mine) == (e - 1) // PIECE - s // PIECE + 1


def regions(*pairs: tuple[int, int]) -> np.ndarray:
    out = np.zeros(len(pairs), dtype=REGION_DTYPE)
    for k, (s, e) in enumerate(pairs):
        out[k] = (s * PAGE, e * PAGE, 2)
    return out


def test_join_pieces_sums_counts_and_drops_every_region_of_a_failed_span():
    owner = np.array([0, 0, 1, 1, 1, 2])
    parts = [  # pieces 0-2, then 3-5 (e.g. two pause windows)
        (regions((1, 2), (17, 19), (40, 41)), np.array([1, 1, 1]), np.array([0, 0, 0], dtype=np.int32)),
        (regions((60, 61), (80, 81)), np.array([0, 1, 1]), np.array([errno.EPERM, 0, 0], dtype=np.int32)),
    ]
    got, counts, errs = _join_pieces(parts, owner, 3)
    assert errs.tolist() == [0, errno.EPERM, 0]
    assert counts.tolist() == [2, 0, 1]
    assert (got["start"] // PAGE).tolist() == [1, 17, 80]
    parts[1][2][0] = errno.ESRCH
    parts[1][2][1] = errno.EPERM
    assert _join_pieces(parts, owner, 3)[2].tolist() == [0, errno.ESRCH, 0]  # the worst errno of its pieces
