"""``wpdump show``: what a chain of images holds, iteration by iteration, from a directory down its parents."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import ChainError
from ..images import format as images
from ..images.chain import Iteration, begins_above, checkpoint_iterations, load_iteration, read_image_file, tree_vpids
from ..images.imgdir import walk_links
from ..ranges import PAGE


@dataclass
class Region:
    """A run of pagemap entries without gaps between them (the images hold no VMA list: this is the nearest)."""

    start: int
    end: int
    present: int  # pages
    parent: int
    lazy: int = 0

    @property
    def pages(self) -> int:
        return (self.end - self.start) // PAGE


@dataclass
class LevelInfo:
    """One iteration of a chain as ``show`` reports it."""

    path: str
    depth: int  # 0: the top
    kind: str  # "pre-dump", "dump" (wpdump.json), "criu" (no wpdump.json)
    created: float | None  # seconds since the epoch (wpdump.json; else the pagemap's mtime)
    pid: int
    pages_present: int
    pages_parent: int
    pages_listed: int
    pages_zeroed: int | None  # wpdump.json only: pages that became zero in this iteration
    pages_bytes: int  # size of the pages file
    pages_allocated: int  # its st_blocks * 512 (less than the size after dedup)
    frozen_us: int | None  # stats-dump frozen_time of a final dump
    iteration: str | None
    incremental: bool | None
    parent: str | None  # the directory the parent link points to
    regions: list[Region] | None = None
    processes: list[int] = field(default_factory=list)  # vpids of the processes it holds, the root first

    def add(self, other: LevelInfo) -> None:
        """Count another process of the same iteration in."""
        self.pages_present += other.pages_present
        self.pages_parent += other.pages_parent
        self.pages_listed += other.pages_listed
        self.pages_bytes += other.pages_bytes
        self.pages_allocated += other.pages_allocated
        self.processes.append(other.pid)

    def as_dict(self) -> dict:
        d = asdict(self)
        if self.regions is None:
            d.pop("regions")
        return d


@dataclass
class ChainInfo:
    top: str
    levels: list[LevelInfo] = field(default_factory=list)
    problem: str | None = None  # why the walk down the parents stopped early

    def as_dict(self) -> dict:
        return {"top": self.top, "levels": [lv.as_dict() for lv in self.levels], "problem": self.problem}


def walk(path: str, pid: int | None = None) -> Iterator[tuple[str, Iteration | None, ChainError | None]]:
    """The directories from ``path`` down its parent links: (dir, iteration or None, why not).

    A level whose images do not load is yielded with its error and the walk follows its parent link still; the
    walk ends (yielding a last error with no iteration) at a missing directory or a loop.
    """
    prev: Iteration | None = None
    for cur, err in walk_links(path, pid):
        if prev is not None and begins_above(prev, cur):
            return
        if err is not None:
            yield cur, None, err
            return
        prev = None
        try:
            it = load_iteration(cur, pid)
            pid, prev = it.pid, it
            yield cur, it, None
        except ChainError as e:
            yield cur, None, e


def regions_of(entries: np.ndarray) -> list[Region]:
    """Runs of entries that touch each other, with their present / in-parent / lazy page counts."""
    if not len(entries):
        return []
    start = entries["vaddr"].astype(np.uint64)
    nr = entries["nr_pages"].astype(np.uint64)
    end = start + nr * np.uint64(PAGE)
    first = np.flatnonzero(np.concatenate(([True], start[1:] != end[:-1])))
    last = np.append(first[1:] - 1, len(entries) - 1)
    flags = entries["flags"]

    def per_region(flag: int) -> np.ndarray:
        return np.add.reduceat(np.where((flags & flag) != 0, nr, np.uint64(0)), first)

    present, parent, lazy = per_region(images.PE_PRESENT), per_region(images.PE_PARENT), per_region(images.PE_LAZY)
    return [
        Region(int(s), int(e), int(p), int(q), int(lz))
        for s, e, p, q, lz in zip(
            start[first].tolist(), end[last].tolist(), present.tolist(), parent.tolist(), lazy.tolist(), strict=True
        )
    ]


def _pages(it: Iteration, flag: int | None) -> int:
    e = it.entries if flag is None else it.entries[(it.entries["flags"] & flag) != 0]
    return int(e["nr_pages"].astype(np.uint64).sum())


def level_info(it: Iteration, depth: int, regions: bool = False) -> LevelInfo:
    """The numbers ``show`` prints for one loaded iteration."""
    meta = it.meta or {}
    try:
        st = os.lstat(it.pages_path)
        size, alloc = st.st_size, st.st_blocks * 512
    except OSError:
        size = alloc = 0
    created = meta.get("created")
    if created is None:
        try:
            created = os.lstat(os.path.join(it.path, images.pagemap_file_name(it.pid))).st_mtime
        except OSError:
            created = None
    kind = meta.get("kind", "criu") if it.meta is not None else "criu"
    frozen = None
    if kind != "pre-dump" and os.path.lexists(os.path.join(it.path, images.STATS_FILE)):
        try:
            stats = images.decode_stats(read_image_file(it.path, images.STATS_FILE),
                                        os.path.join(it.path, images.STATS_FILE))
            frozen = stats.get("frozen_time")
        except (images.ImageError, ChainError):
            frozen = None
    zeroed = (meta.get("result") or {}).get("pages_zeroed") if it.meta is not None else None
    return LevelInfo(
        path=it.path, depth=depth, kind=kind, created=created, pid=it.pid,
        pages_present=_pages(it, images.PE_PRESENT), pages_parent=_pages(it, images.PE_PARENT),
        pages_listed=_pages(it, None), pages_zeroed=zeroed, pages_bytes=size, pages_allocated=alloc,
        frozen_us=frozen, iteration=meta.get("iteration"), incremental=meta.get("incremental"),
        parent=it.parent_path, regions=regions_of(it.entries) if regions else None, processes=[it.pid],
    )


def _add_shared(lv: LevelInfo, path: str) -> None:
    """Count the shared objects the iteration stores (pagemap-shmem-SHMID.img: whole, never in a parent) in."""
    for name in sorted(os.listdir(path)):
        if not re.fullmatch(r"pagemap-shmem-\d+\.img", name):
            continue
        try:
            pages_id, entries = images.decode_pagemap(read_image_file(path, name), os.path.join(path, name))
            st = os.lstat(os.path.join(path, images.pages_file_name(pages_id)))
        except (images.ImageError, ChainError, OSError):
            continue  # verify -D names what is wrong with it
        n = int(entries["nr_pages"].astype(np.uint64).sum())
        lv.pages_present += n
        lv.pages_listed += n
        lv.pages_bytes += st.st_size
        lv.pages_allocated += st.st_blocks * 512


def resolve_top(path: str) -> str:
    """``path``, or for the directory ``wpdump checkpoint`` wrote, its highest-numbered iteration (the top)."""
    its = checkpoint_iterations(path)
    return its[-1] if its else path


def show(path: str, regions: bool = False) -> ChainInfo:
    """The chain from ``path`` down through its parents, top first; a level of a tree counts every process it holds
    (``processes``). A level that does not load ends the list and is named in ``problem`` (ChainError if even
    the top does not load)."""
    info = ChainInfo(top=os.path.normpath(path))
    for depth, (_d, it, err) in enumerate(walk(path)):
        if err is not None:
            if depth == 0:
                raise err
            info.problem = str(err)
            break
        assert it is not None
        lv = level_info(it, depth, regions)
        for v in tree_vpids(it.path)[1:] if (it.meta or {}).get("processes") else ():
            try:
                other = level_info(load_iteration(it.path, v), depth)
            except ChainError as e:
                info.problem = str(e)
                continue
            other.pages_zeroed = None
            lv.add(other)
        _add_shared(lv, it.path)
        info.levels.append(lv)
    return info


__all__ = ["ChainInfo", "LevelInfo", "Region", "level_info", "regions_of", "resolve_top", "show", "walk"]
