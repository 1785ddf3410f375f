"""``wpdump verify -D DIR``: the structure of a chain of images, offline.

``check_chain`` walks a chain and lists every problem it finds (magics, framing, entry order, missing parent
pages, pages file sizes, broken or looping parent links, metadata of another process).
"""

from __future__ import annotations

import errno
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import ChainError
from ..images import format as images
from ..images.chain import Iteration, check_pages_file, missing_in_parent
from .show import walk


@dataclass
class StructureReport:
    """What ``check_chain`` found: the directories walked (top first), and every problem."""

    top: str
    levels: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    pages_listed: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok}


def _check_stats(d: str, problems: list[str]) -> None:
    name = os.path.join(d, images.STATS_FILE)
    if not os.path.lexists(name):
        return
    try:
        with open(name, "rb") as f:
            images.decode_stats(f.read(), name)
    except images.ImageError as e:
        problems.append(str(e))
    except OSError as e:
        problems.append(f"{name}: {e.strerror}")


def _check_meta(child: Iteration, it: Iteration, problems: list[str]) -> None:
    """A child's wpdump.json must name this level's iteration as its parent, and both be of one process."""
    cm, pm = child.meta, it.meta
    if not cm or not pm:
        return
    if cm.get("parent_iteration") and pm.get("iteration") and cm["parent_iteration"] != pm["iteration"]:
        problems.append(
            f"{child.path}: wpdump.json names parent iteration {cm['parent_iteration']}, but its parent {it.path} "
            f"is iteration {pm['iteration']}"
        )
    keys = ("pid", "start_ticks", "boot_id")
    if any(k in cm and k in pm and cm[k] != pm[k] for k in keys):
        problems.append(
            f"{it.path} is an image of another process (pid {pm.get('pid')}, started at tick "
            f"{pm.get('start_ticks')}) than its child {child.path} (pid {cm.get('pid')}, tick {cm.get('start_ticks')})"
        )


def check_chain(path: str, pid: int | None = None) -> StructureReport:
    """Walk the chain from ``path`` down its parent links and report every problem found (not only the first).

    Per level: pagemap magics, framing and entries (ascending, non-overlapping, known flags), inventory, stats,
    wpdump.json, the pages file's size; between levels: every PE_PARENT page present in the parent, the parent
    link (missing directory, loop, PE_PARENT entries without a link), metadata of one process.
    """
    rep = StructureReport(top=os.path.normpath(path))
    child: Iteration | None = None
    for depth, (d, it, err) in enumerate(walk(path, pid)):
        if it is None:
            rep.problems.append(str(err))
            if not os.path.isdir(d) or (err is not None and err.errno == errno.ELOOP):
                break
            rep.levels.append(d)
            child = None  # what this level lists is unknown: the next level's coverage cannot be checked
            continue
        rep.levels.append(d)
        if depth == 0:
            rep.pages_listed = int(it.entries["nr_pages"].astype(np.uint64).sum())
        try:
            check_pages_file(it)
        except ChainError as e:
            rep.problems.append(str(e))
        _check_stats(d, rep.problems)
        if child is not None:
            gap = missing_in_parent(child, it)
            if gap:
                rep.problems.append(gap)
            _check_meta(child, it, rep.problems)
        link = os.path.join(d, "parent")
        if not os.path.islink(link):
            if os.path.lexists(link):
                rep.problems.append(f"{link} is not a symlink: the parent link is ignored")
            if len(it.ranges(images.PE_PARENT)):
                n = int(it.entries["nr_pages"][(it.entries["flags"] & images.PE_PARENT) != 0].astype(np.uint64).sum())
                rep.problems.append(f"{d}: {n} pages are marked in-parent, but there is no parent link")
        child = it
    return rep
