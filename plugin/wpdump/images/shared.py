"""Shared memory objects of an iteration, in CRIU's layout: ``pagemap-shmem-SHMID.img`` lists an object's pages
by their offset in it (vaddr = byte offset), its pages in ``pages-N.img``; wpdump.json records the windows where
each process maps an object. A page a process sees through a shared mapping is read from the object's image.

Shared objects are dumped whole every iteration (a write through another mapper is invisible to a tracker:
docs/kernel.md rule 7), so only the top iteration's images are read: they refer to no parent.
"""

from __future__ import annotations

import errno
import os
from typing import NamedTuple

import numpy as np

from .. import ranges
from ..errors import ChainError
from ..ranges import PAGE, in_ranges
from . import format as images


def shmem_pagemap_file_name(shmid: int) -> str:
    """File name of the pagemap of shared memory object ``shmid`` (as CRIU names it)."""
    return f"pagemap-shmem-{shmid}.img"


class Window(NamedTuple):
    """Where a process maps an object: addresses [start, end) show the object from byte ``offset`` on."""

    start: int
    end: int
    offset: int
    shmid: int


class SharedImages:
    """The shared objects of the iteration in ``path`` as one process sees them through ``windows``."""

    def __init__(self, path: str, windows: list[Window]) -> None:
        self.path = path
        self.windows = sorted(windows)
        self._objects: dict[int, tuple[str, np.ndarray]] = {}

    @classmethod
    def of(cls, path: str, meta: dict | None) -> SharedImages | None:
        """The shared objects a process's metadata (``member_meta``) names, or None when it maps none."""
        rows = (meta or {}).get("shared") or []
        return cls(path, [Window(*map(int, r)) for r in rows]) if rows else None

    def _object(self, shmid: int) -> tuple[str, np.ndarray]:
        """(pages file, entries) of one object."""
        got = self._objects.get(shmid)
        if got is None:
            name = shmem_pagemap_file_name(shmid)
            from .chain import read_image_file

            try:
                pages_id, entries = images.decode_pagemap(read_image_file(self.path, name),
                                                          os.path.join(self.path, name))
            except images.ImageError as e:
                raise ChainError(str(e), errno=errno.EINVAL) from None
            got = self._objects[shmid] = (os.path.join(self.path, images.pages_file_name(pages_id)), entries)
        return got

    def ranges(self) -> np.ndarray:
        """The addresses whose pages the objects' images hold (the process's view)."""
        parts = []
        for w in self.windows:
            _, entries = self._object(w.shmid)
            r = ranges.clip_sorted(images.ranges_of(entries), w.offset, w.offset + (w.end - w.start))
            if len(r):
                parts.append(r - np.uint64(w.offset) + np.uint64(w.start))
        return ranges.union(*parts) if parts else ranges.EMPTY

    def covers(self, addrs: np.ndarray) -> np.ndarray:
        """Which of ``addrs`` lie in a shared window (their content is the object's, listed or zero)."""
        spans = ranges.from_pairs([(w.start, w.end) for w in self.windows])
        return in_ranges(np.asarray(addrs, dtype=np.uint64), spans)

    def read_into(self, addrs: np.ndarray, out: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Fill rows of ``out`` (n×PAGE) with the pages at ``addrs`` the objects' images hold; returns the mask of
        those found (the others are left untouched)."""
        addrs = np.asarray(addrs, dtype=np.uint64)
        rows = np.arange(len(addrs)) if rows is None else np.asarray(rows, dtype=np.int64)
        found = np.zeros(len(addrs), dtype=bool)
        flat = out.reshape(-1)
        for w in self.windows:
            sel = np.flatnonzero((addrs >= w.start) & (addrs < w.end))
            if not len(sel):
                continue
            pages_path, entries = self._object(w.shmid)
            offs = images.page_offsets(entries, addrs[sel] - np.uint64(w.start) + np.uint64(w.offset))
            ok = offs >= 0
            if not ok.any():
                continue
            from .chain import file_runs  # chain imports this module

            firsts, counts, starts = file_runs(rows[sel[ok]], offs[ok])
            fd = _open(pages_path)
            try:  # one read per run of pages consecutive in the rows and in the pages file
                for r, n, off in zip(firsts.tolist(), counts.tolist(), starts.tolist(), strict=True):
                    if os.preadv(fd, [memoryview(flat[r * PAGE : (r + n) * PAGE])], off) != n * PAGE:
                        raise ChainError(f"{pages_path}: truncated at offset {off}", errno=errno.EINVAL)
            finally:
                os.close(fd)
            found[sel[ok]] = True
        return found


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise ChainError(f"{path}: {e.strerror}", errno=e.errno) from None
