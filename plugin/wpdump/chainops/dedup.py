"""``wpdump dedup``: free the pages of the parents that the chain's top no longer needs, as ``criu dedup`` does.

A page present in a parent is superseded when some level above it has its own copy (PE_PRESENT) or no longer
lists it (the page became zero or was unmapped). Its bytes in the parent's pages file are punched out with
``fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)``: whole pages only, the file keeps its size and layout,
and the chain still restores (and verifies) its top. The parents themselves are no longer complete checkpoints
afterwards: a punched page reads as zero.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import ranges
from ..errors import ChainError, WpdumpError
from ..images import format as images
from ..images.chain import Iteration, load_chain
from ..ranges import PAGE
from ..target.native import punch_hole


class DedupError(WpdumpError):
    """A pages file cannot be punched (file system without hole punching, permissions)."""


@dataclass
class DedupLevel:
    path: str
    pages_file: str
    pages_superseded: int  # pages of this level the top no longer needs (punched, or already holes)
    holes: int  # fallocate calls (runs of superseded pages contiguous in the file)
    allocated_before: int  # st_blocks * 512 of the pages file
    allocated_after: int

    @property
    def bytes_freed(self) -> int:
        return max(0, self.allocated_before - self.allocated_after)


@dataclass
class DedupResult:
    top: str
    dry_run: bool
    levels: list[DedupLevel] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def pages_superseded(self) -> int:
        return sum(lv.pages_superseded for lv in self.levels)

    @property
    def bytes_freed(self) -> int:
        return sum(lv.bytes_freed for lv in self.levels)

    def as_dict(self) -> dict:
        d = asdict(self)
        for lv, dl in zip(self.levels, d["levels"], strict=True):
            dl["bytes_freed"] = lv.bytes_freed
        d["pages_superseded"] = self.pages_superseded
        d["bytes_freed"] = self.bytes_freed
        return d


def superseded(chain: list[Iteration]) -> list[np.ndarray]:
    """Per level of the chain (top first), the present page ranges the top does not read from it.

    The top reads a page from level k only when every level above k lists it PE_PARENT.
    """
    out = [ranges.EMPTY.copy()]
    through = chain[0].ranges(images.PE_PARENT)
    for it in chain[1:]:
        out.append(ranges.subtract(it.ranges(images.PE_PRESENT), through))
        through = ranges.intersect(through, it.ranges(images.PE_PARENT))
    return out


def file_spans(it: Iteration, r: np.ndarray) -> np.ndarray:
    """Byte spans [offset, end) in ``it``'s pages file holding the pages of ``r`` (subsets of its present
    ranges), merged where they touch in the file."""
    if not len(r):
        return np.zeros((0, 2), dtype=np.uint64)
    if len(ranges.subtract(r, it.ranges(images.PE_PRESENT))):
        raise ValueError("ranges are not inside the present ranges")
    # a range of r may span touching PE_PRESENT entries: they are consecutive in the file too
    off = images.page_offsets(it.entries, r[:, 0]).astype(np.uint64)
    end = off + (r[:, 1] - r[:, 0])
    return ranges.merge(np.column_stack((off, end)).astype(np.uint64))


def punch(fd: int, offset: int, length: int, what: str) -> None:
    """fallocate(PUNCH_HOLE | KEEP_SIZE) of [offset, offset + length) of ``fd``."""
    try:
        punch_hole(fd, offset, length)
    except WpdumpError as e:
        err = e.errno
        if err in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise DedupError(f"{what}: the file system does not support punching holes", errno=err) from None
        raise DedupError(f"{what}: cannot punch a hole: {os.strerror(err)}", errno=err) from None


def _allocated(path: str) -> int:
    try:
        return os.lstat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def dedup(path: str, dry_run: bool = False) -> DedupResult:
    """Punch the superseded pages out of the parents' pages files of the chain whose top is ``path``.

    The chain is checked first (ChainError if broken). Returns per parent the pages superseded and the bytes
    freed, measured as the drop of the pages file's allocated blocks (0 for pages already punched).
    """
    t0 = time.perf_counter()
    chain = load_chain(path)
    res = DedupResult(top=chain[0].path, dry_run=dry_run)
    for it, gone in zip(chain[1:], superseded(chain)[1:], strict=True):
        spans = file_spans(it, gone)
        before = _allocated(it.pages_path)
        lv = DedupLevel(it.path, it.pages_path, ranges.total(gone) // PAGE, len(spans), before, before)
        res.levels.append(lv)
        if dry_run or not len(spans):
            continue
        try:
            fd = os.open(it.pages_path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise ChainError(f"{it.pages_path}: {e.strerror}", pid=it.pid, errno=e.errno) from None
        try:
            for off, end in spans.tolist():
                punch(fd, off, end - off, it.pages_path)
            os.fsync(fd)
        except OSError as e:
            raise DedupError(f"{it.pages_path}: {e.strerror}", errno=e.errno) from None
        finally:
            os.close(fd)
        lv.allocated_after = _allocated(it.pages_path)
    res.seconds = time.perf_counter() - t0
    return res
