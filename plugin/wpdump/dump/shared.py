"""Shared memory of a tree, written once per object per iteration in CRIU's layout (images/shared.py).

An object (a MAP_SHARED mapping's file: anonymous shared memory, memfd, SysV shm, a shared file) is known by
the (device, inode) its mappings show; its pages are read through the first mapping that covers each of them,
whichever process that is, and stored once however many processes map it.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .. import ranges
from ..errors import NoSuchProcess
from ..images import format as images
from ..images import imgdir
from ..images.shared import shmem_pagemap_file_name
from ..ranges import PAGE
from ..target.tree import Member
from ..target.vmas import Policy, Vma
from ..tracking.tracker import Harvest
from . import pages
from .pages import Progress

log = logging.getLogger("wpdump.shared")


@dataclass
class Mapping:
    """One process's mapping of a shared object, and the address ranges of it to copy this iteration."""

    member: Member
    vma: Vma
    copy: np.ndarray

    def to_offsets(self, r: np.ndarray) -> np.ndarray:
        return r - np.uint64(self.vma.start) + np.uint64(self.vma.offset)

    def to_addrs(self, r: np.ndarray) -> np.ndarray:
        return r - np.uint64(self.vma.offset) + np.uint64(self.vma.start)


def is_shared(v: Vma, policy: Policy) -> bool:
    """Whether a VMA maps a shared object this module stores (not memfd_secret, which nothing can read)."""
    return v.shared and not v.secret and policy is Policy.WHOLE


def shared_ranges(h: Harvest) -> np.ndarray:
    """The address ranges of ``h``'s shared mappings (left out of the process's own pagemap)."""
    return ranges.from_pairs([(v.vma.start, v.vma.end) for v in h.vmas if is_shared(v.vma, v.policy)])


def collect(harvests: list[tuple[Member, Harvest]]) -> dict[tuple[str, int], list[Mapping]]:
    """The shared objects the processes map, by (device, inode), each with its mappings in tree order."""
    objs: dict[tuple[str, int], list[Mapping]] = {}
    for m, h in harvests:
        for v in h.vmas:
            if is_shared(v.vma, v.policy):
                objs.setdefault((v.vma.dev, v.vma.inode), []).append(Mapping(m, v.vma, v.copy))
    return objs


def _shmids(keys: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """An id per object: its inode number (as CRIU names anonymous shared memory), made unique if two devices
    share one."""
    out: dict[tuple[str, int], int] = {}
    used: set[int] = set()
    for k in keys:
        sid = k[1]
        while sid in used:
            sid += 1 << 40
        used.add(sid)
        out[k] = sid
    return out


@dataclass
class SharedResult:
    """What was written of the shared objects."""

    objects: dict[str, dict]  # shmid -> its record in wpdump.json
    windows: dict[int, list[list[int]]]  # pid -> [start, end, offset, shmid] of each of its shared mappings
    pages_written: int = 0
    copy_s: float = 0.0
    write_s: float = 0.0


def _pieces(maps: list[Mapping]) -> list[tuple[int, np.ndarray]]:
    """(mapping index, offset ranges) to read through it: each page needed from the first mapping covering it."""
    assigned = ranges.EMPTY
    rows: list[tuple[int, int, int]] = []
    for i, mp in enumerate(maps):
        if not len(mp.copy):
            continue
        own = ranges.subtract(ranges.merge(mp.to_offsets(mp.copy)), assigned)
        if len(own):
            assigned = ranges.union(assigned, own)
            rows.extend((int(s), int(e), i) for s, e in own)
    rows.sort()
    return [  # consecutive runs through one mapping are read in one go
        (i, np.array([(s, e) for s, e, _ in group], dtype=np.uint64))
        for i, group in itertools.groupby(rows, key=lambda row: row[2])
    ]


def _write_object(st: imgdir.Staging, shmid: int, pages_id: int, maps: list[Mapping], res: SharedResult,
                  progress: Progress | None) -> int:
    """Write one object's pages and pagemap (offsets); returns its pages. Raises NoSuchProcess naming a mapper
    that exited meanwhile (the caller retries without it)."""
    name = images.pages_file_name(pages_id)
    fd = st.create(name)
    written_offs: list[np.ndarray] = []
    try:
        for i, offs in _pieces(maps):
            mp = maps[i]
            unreadable = ranges.from_pairs([(mp.vma.start, mp.vma.end)]) if mp.vma.perms[0] != "r" else ranges.EMPTY
            got, _, copy_s, write_s = pages.copy_and_write(
                mp.member.pid, mp.to_addrs(offs), ranges.EMPTY, fd, os.path.join(st.dest, name), progress, unreadable
            )
            res.copy_s += copy_s
            res.write_s += write_s
            if len(got):
                written_offs.append(mp.to_offsets(got))
    except BaseException:
        os.close(fd)
        st.remove(name)
        raise
    st.keep(fd, name)  # fsynced at the commit, with the other files
    t0 = time.perf_counter()
    written = ranges.merge(np.vstack(written_offs)) if written_offs else ranges.EMPTY
    st.write_file(shmem_pagemap_file_name(shmid),
                  images.encode_pagemap(pages_id, images.entries_from_ranges(written, ranges.EMPTY)))
    res.write_s += time.perf_counter() - t0
    return ranges.total(written) // PAGE


def write_objects(
    st: imgdir.Staging, objs: dict[tuple[str, int], list[Mapping]], first_pages_id: int, progress: Progress | None,
    strict: bool, frozen: Callable[[], None] | None = None,
) -> SharedResult:
    """Write every shared object once, pages ids from ``first_pages_id`` on. A mapper that exits meanwhile is left
    out (unless ``strict``: the tree is frozen, so that cannot happen and is an error)."""
    res = SharedResult({}, {})
    ids = _shmids(sorted(objs))
    for n, (key, maps) in enumerate(sorted(objs.items())):
        shmid, pages_id = ids[key], first_pages_id + n
        live = list(maps)
        while live:
            try:
                npages = _write_object(st, shmid, pages_id, live, res, progress)
                break
            except NoSuchProcess as e:
                if strict:
                    raise
                log.info("pid %s exited while its shared memory was read: read through another mapping", e.pid)
                live = [mp for mp in live if mp.member.pid != e.pid and os.path.exists(f"/proc/{mp.member.pid}")]
        else:
            continue  # every process mapping it exited: nothing maps it any more
        res.pages_written += npages
        v = live[0].vma
        res.objects[str(shmid)] = {"dev": v.dev, "inode": v.inode, "path": v.path, "pages_id": pages_id,
                                   "pages": npages}
        for mp in live:
            res.windows.setdefault(mp.member.pid, []).append([mp.vma.start, mp.vma.end, mp.vma.offset, shmid])
    if frozen is not None:
        frozen()
    return res
