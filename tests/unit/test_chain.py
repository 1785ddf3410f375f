"""chain: image chains written to a temporary directory (pagemaps by the codec, pages files by hand) and read
back page by page, against a model that resolves each page top down as CRIU does."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest
from wpdump.images import chain
from wpdump.images import format as images

PAGE = 4096
PID = 4242
BASE = 0x7F12_3400_0000
N = 96  # pages of the address range the levels describe


def content(level: int, page: int) -> np.ndarray:
    """A page no other (level, page) has: its address and level in the first bytes, a fill after."""
    p = np.full(PAGE, (level * 31 + page) % 251 + 1, dtype=np.uint8)
    p[:8] = np.frombuffer(np.uint64(BASE + page * PAGE).tobytes(), dtype=np.uint8)
    p[8] = level
    return p


def runs(cells: np.ndarray, k: int) -> np.ndarray:
    idx = np.flatnonzero(cells == k)
    out: list[list[int]] = []
    for i in idx.tolist():
        if out and out[-1][1] == BASE + i * PAGE:
            out[-1][1] += PAGE
        else:
            out.append([BASE + i * PAGE, BASE + (i + 1) * PAGE])
    return np.array(out, dtype=np.uint64).reshape(-1, 2)


def write_level(d: pathlib.Path, level: int, cells: np.ndarray, parent: pathlib.Path | None) -> None:
    """One images directory: cells[i] 0 = page i not listed, 1 = present here, 2 = in the parent."""
    d.mkdir()
    pages_id = 10 + level
    e = images.entries_from_ranges(runs(cells, 1), runs(cells, 2))
    (d / images.pagemap_file_name(PID)).write_bytes(images.encode_pagemap(pages_id, e))
    present = np.flatnonzero(cells == 1).tolist()
    data = b"".join(content(level, i).tobytes() for i in present)
    (d / images.pages_file_name(pages_id)).write_bytes(data)
    if parent is not None:
        os.symlink(os.path.relpath(parent, d), d / "parent")


def random_chain(tmp: pathlib.Path, rng: np.random.Generator, depth: int) -> tuple[pathlib.Path, list[np.ndarray]]:
    levels: list[np.ndarray] = []
    prev: pathlib.Path | None = None
    for lv in range(depth):
        cells = rng.choice(3, size=N, p=[0.3, 0.35, 0.35])
        if lv == 0:
            cells[cells == 2] = 0
        else:
            cells[(cells == 2) & (levels[-1] == 0)] = 1  # in-parent only where the parent lists the page
        d = tmp / f"it{lv}"
        write_level(d, lv, cells, prev)
        levels.append(cells)
        prev = d
    return prev, levels


def model(levels: list[np.ndarray], page: int) -> tuple[int, np.ndarray | None]:
    """(level index counted from the top, content) of a page; (-1, None) when it is zero."""
    for k, cells in enumerate(reversed(levels)):
        c = cells[page]
        if c == 0:
            return -1, None
        if c == 1:
            return k, content(len(levels) - 1 - k, page)
    return -1, None


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_read_pages_resolves_top_down(tmp_path: pathlib.Path, depth: int) -> None:
    rng = np.random.default_rng(90 + depth)
    top, levels = random_chain(tmp_path, rng, depth)
    ch = chain.load_chain(str(top))
    assert [it.path for it in ch] == [str(tmp_path / f"it{lv}") for lv in reversed(range(depth))]
    assert all(it.pid == PID for it in ch)
    pick = np.sort(rng.choice(N + 8, size=70, replace=False)) - 4  # also pages outside every level
    addrs = (BASE + pick * PAGE).astype(np.uint64)
    level, offset = chain.locate_pages(ch, addrs)
    got = chain.read_pages(ch, addrs)
    assert got.shape == (len(addrs), PAGE)
    for i, p in enumerate(pick.tolist()):
        want_level, want = model(levels, p) if 0 <= p < N else (-1, None)
        assert level[i] == want_level, p
        if want is None:
            assert not got[i].any(), p
        else:
            assert np.array_equal(got[i], want), p
            assert offset[i] == PAGE * int((levels[depth - 1 - want_level][:p] == 1).sum())
    # rows chosen by the caller, untouched where no level holds the page
    out = np.full((2 * len(addrs), PAGE), 0xEE, dtype=np.uint8)
    rows = np.arange(len(addrs), dtype=np.int64) * 2 + 1
    lv = chain.read_pages_into(ch, addrs, out, rows)
    assert np.array_equal(lv, level)
    assert (out[0::2] == 0xEE).all()
    held = level >= 0
    assert np.array_equal(out[1::2][held], got[held]) and (out[1::2][~held] == 0xEE).all()


def test_file_runs_against_brute_force() -> None:
    rng = np.random.default_rng(95)
    for _ in range(200):
        n = int(rng.integers(0, 40))
        idx = np.sort(rng.choice(60, size=n, replace=False))
        offsets = (np.cumsum(rng.choice([1, 1, 1, 2, 5], size=n)) * PAGE).astype(np.uint64)
        firsts, counts, offs = chain.file_runs(idx, offsets)
        want: list[list[int]] = []
        for i, o in zip(idx.tolist(), offsets.tolist(), strict=True):
            if want and want[-1][0] + want[-1][1] == i and want[-1][2] + want[-1][1] * PAGE == o:
                want[-1][1] += 1
            else:
                want.append([i, 1, o])
        assert [list(t) for t in zip(firsts.tolist(), counts.tolist(), offs.tolist(), strict=True)] == want


def test_load_chain_refuses_broken_chains(tmp_path: pathlib.Path) -> None:
    base = np.array([1] * 4 + [0] * 4)
    write_level(tmp_path / "a", 0, base, None)
    write_level(tmp_path / "b", 1, np.array([2] * 4 + [1] * 4), tmp_path / "a")
    assert len(chain.load_chain(str(tmp_path / "b"))) == 2
    # in-parent pages the parent does not list
    write_level(tmp_path / "c", 2, np.array([0] * 4 + [2] * 4), tmp_path / "a")
    with pytest.raises(chain.ChainError, match="4 pages marked in-parent are absent"):
        chain.load_chain(str(tmp_path / "c"))
    # in-parent pages and no parent link
    write_level(tmp_path / "d", 3, np.array([2] * 8), None)
    with pytest.raises(chain.ChainError, match="no parent link"):
        chain.load_chain(str(tmp_path / "d"))
    # a pages file shorter than the present pages
    write_level(tmp_path / "e", 4, base, None)
    p = tmp_path / "e" / images.pages_file_name(14)
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(chain.ChainError, match="4 present pages"):
        chain.load_chain(str(tmp_path / "e"))
    # a loop of parent links
    write_level(tmp_path / "f", 5, np.array([2] * 8), tmp_path / "g")
    write_level(tmp_path / "g", 6, np.array([2] * 8), tmp_path / "f")
    with pytest.raises(chain.ChainError, match="loop"):
        chain.load_chain(str(tmp_path / "f"))


def test_decoded_pagemaps_kept_only_while_the_file_is_that_version(tmp_path: pathlib.Path) -> None:
    """A pagemap the writer remembered (or one read once) is not decoded again while its file is unchanged; a
    rewrite in place to the same size right after is read anew (the stat that took the signature gets the next
    change a fine-grained time)."""
    cells = np.array([1, 1, 0, 1] * (N // 4))
    write_level(tmp_path / "a", 0, cells, None)
    name = str(tmp_path / "a" / images.pagemap_file_name(PID))
    e = images.entries_from_ranges(runs(cells, 1), ranges_none())
    chain.remember_pagemap(name, 10, e)
    first = chain.load_iteration(str(tmp_path / "a"), PID)
    assert first.entries is e and not first.entries.flags.writeable  # the writer's array, not decoded again
    data = images.encode_pagemap(11, e)  # another pages id: the file keeps its size
    assert len(data) == os.path.getsize(name)
    with open(name, "r+b") as f:  # in place: same inode, same size
        f.write(data)
    again = chain.load_iteration(str(tmp_path / "a"), PID)
    assert again.pages_id == 11 and again.entries.tobytes() == e.tobytes()
    assert chain.load_iteration(str(tmp_path / "a"), PID).entries is again.entries  # read once, then kept


def ranges_none() -> np.ndarray:
    return np.zeros((0, 2), dtype=np.uint64)
