"""Roll a live process's memory back to a checkpoint in place (``wpdump restore-memory``).

The target is frozen; its VMA layout must be the checkpoint's. Pages that differ from the image are
written back through /proc/PID/mem; pages the image lacks (zero, or the file's own content in a
private file mapping) are dropped with an injected ``madvise(MADV_DONTNEED)``. When wpdump has been
tracking the process since that very checkpoint, only the pages it dirtied since are looked at.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import ranges
from ..errors import UnreadableMemory, WpdumpError, from_errno
from ..images.chain import Iteration, load_chain, read_pages_into, same_process, tree_vpids
from ..ranges import PAGE, from_pages, page_addrs
from ..target import freeze
from ..target.memory import Reader, pread_into
from ..target.process import check_alive, open_mapped_file, open_proc
from ..target.tree import Member
from ..target.vmas import KERNEL_VMAS, Vma, read_maps
from ..tracking import keeper
from ..tracking.session import KeeperSession
from ..tracking.tracker import Tracker

log = logging.getLogger("wpdump.rollback")

BATCH_PAGES = 16384  # 64 MiB of image and of memory per step
MADV_DONTNEED = 4


class LayoutMismatch(WpdumpError):
    """The process's VMAs are no longer those of the checkpoint: it cannot be rolled back in place."""


@dataclass
class RollbackResult:
    """What restore-memory did (seconds, page counts)."""

    pid: int
    images_dir: str
    tracked: bool  # only the pages dirtied since the checkpoint were examined
    processes: int = 0
    pages_examined: int = 0
    pages_written: int = 0
    pages_dropped: int = 0
    frozen_s: float = 0.0
    total_s: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _saved_layout(top: Iteration) -> list[tuple[int, int, str, int, str, str]]:
    if not top.meta or "vmas" not in top.meta:
        raise LayoutMismatch(
            f"{top.path} holds no VMA layout record (not written by this wpdump): cannot check the layout",
            pid=top.pid, errno=errno.EINVAL,
        )
    return [tuple(v) for v in top.meta["vmas"]]


def check_layout(pid: int, top: Iteration, now: list[Vma]) -> list[Vma]:
    """The current VMAs that the checkpoint dumped; LayoutMismatch naming the first difference."""
    saved = _saved_layout(top)
    cur = {(v.start, v.end): v for v in now if v.path not in KERNEL_VMAS}
    out = []
    for start, end, perms, offset, path, _ in saved:
        v = cur.get((start, end))
        if v is None or v.path != path or v.offset != offset or v.shared != (perms[3] == "s"):
            near = [str(x) for x in now if x.start < end and start < x.end]
            what = f"now {', '.join(near)}" if near else "unmapped since"
            raise LayoutMismatch(
                f"pid {pid}: the VMA {start:#x}-{end:#x} {perms}{' ' + path if path else ''} of the checkpoint is "
                f"{what}: "
                "the layout changed, memory cannot be rolled back in place", pid=pid, errno=errno.EINVAL,
            )
        out.append(v)
    known = {(s, e) for s, e, *_ in saved}
    for v in now:
        if (v.start, v.end) not in known and v.path not in KERNEL_VMAS:
            raise LayoutMismatch(
                f"pid {pid}: the VMA {v} appeared since the checkpoint: the layout changed, memory cannot be "
                "rolled back in place", pid=pid, errno=errno.EINVAL,
            )
    return out


def _runs(addrs: np.ndarray) -> list[tuple[int, int, int]]:
    """(first index, end index, start address) of each run of consecutive pages in sorted ``addrs``."""
    if not len(addrs):
        return []
    brk = np.flatnonzero(np.diff(addrs) != PAGE) + 1
    bounds = np.concatenate(([0], brk, [len(addrs)]))
    return [(int(a), int(b), int(addrs[a])) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


class _Memory:
    """Reads and writes of the frozen target's memory through /proc/PID/mem (works on any protection; reads
    never pin, so pages shared copy-on-write stay shared)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.reader = Reader(pid, pin=False)
        try:
            self.fd = open_proc(pid, "mem", os.O_RDWR)
        except BaseException:
            self.reader.close()
            raise

    def read(self, addrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The pages at sorted ``addrs`` and a mask of those that could be read (guard pages cannot)."""
        out = np.zeros((len(addrs), PAGE), dtype=np.uint8)
        ok = self.reader.read_into(from_pages(addrs), out.reshape(-1))
        return out, np.ones(len(addrs), dtype=bool) if ok is None else ok

    def write(self, addrs: np.ndarray, rows: np.ndarray) -> None:
        for a, b, start in _runs(addrs):
            view = memoryview(rows[a:b]).cast("B")
            off = 0
            while off < len(view):
                n = os.pwrite(self.fd, view[off:], start + off)
                if n <= 0:
                    raise WpdumpError(f"pid {self.pid}: short write at {start + off:#x}", pid=self.pid, errno=errno.EIO)
                off += n

    def close(self) -> None:
        os.close(self.fd)
        self.reader.close()


def _file_content(pid: int, v: Vma, addrs: np.ndarray) -> np.ndarray:
    """The file's own content for pages of a private file mapping (what an absent page reads as)."""
    out = np.zeros((len(addrs), PAGE), dtype=np.uint8)
    try:
        fd = open_mapped_file(pid, v.start, v.end, v.dev, v.inode, v.path)
    except OSError as e:
        raise from_errno(e.errno or errno.EIO, pid, f"open the file mapped at {v}") from None
    try:
        flat = out.reshape(-1)
        for a, b, start in _runs(addrs):
            pread_into(fd, v.offset + start - v.start, flat[a * PAGE : b * PAGE])
    finally:
        os.close(fd)
    return out


def _mapped_end(pid: int, v: Vma) -> int:
    """Where the object behind a file or shared mapping ends inside ``v`` (page-rounded): past it the mapping
    has no page to read or write (SIGBUS), so the image holds none there either."""
    if v.anonymous:
        return v.end
    try:
        fd = open_mapped_file(pid, v.start, v.end, v.dev, v.inode, v.path)
    except OSError:
        return v.end  # then reading the pages says what is wrong
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode):  # a device: its size says nothing of what it maps
        return v.end
    size = st.st_size
    end = v.start + max(0, -(-(size - v.offset) // PAGE) * PAGE)
    return min(v.end, end)


def _drop(freezer: freeze.Freezer, r: np.ndarray) -> np.ndarray:
    """madvise(MADV_DONTNEED) inside the frozen target on ranges ``r``; returns the ranges where it failed
    (e.g. an mlocked VMA: EINVAL)."""
    return ranges.from_pairs(freezer.madvise([(int(s), int(e)) for s, e in r], MADV_DONTNEED))


def _rollback(pid: int, freezer: freeze.Freezer, chain: list[Iteration], vmas: list[Vma], candidates: np.ndarray,
              res: RollbackResult) -> None:
    """Make every page in ``candidates`` equal to the chain's top."""
    mem = _Memory(pid)
    drop_addrs: list[np.ndarray] = []
    drop_rows: list[tuple[np.ndarray, np.ndarray]] = []
    try:
        for v in vmas:
            addrs = page_addrs(ranges.clip_sorted(candidates, v.start, _mapped_end(pid, v)))
            for i in range(0, len(addrs), BATCH_PAGES):
                a = addrs[i : i + BATCH_PAGES]
                want = np.zeros((len(a), PAGE), dtype=np.uint8)
                if v.shared and chain[0].shared is not None:  # the object's image, stored once for the tree
                    absent = ~chain[0].shared.read_into(a, want)
                else:
                    absent = read_pages_into(chain, a, want) < 0
                if absent.any() and not v.shared and not v.anonymous:
                    want[absent] = _file_content(pid, v, a[absent])
                cur, readable = mem.read(a)
                if (~readable & ~absent).any():  # the image holds data where the process has none to read
                    bad = from_pages(a[~readable & ~absent])
                    raise UnreadableMemory(int(bad[0, 0]), int(bad[0, 1]), str(v), pid=pid, errno=errno.EIO)
                diff = (cur.view(np.uint64) != want.view(np.uint64)).any(axis=1) & readable
                res.pages_examined += len(a)
                zap = diff & absent & ~np.bool_(v.shared)
                write = diff & ~zap
                if write.any():
                    mem.write(a[write], np.ascontiguousarray(want[write]))
                    res.pages_written += int(write.sum())
                if zap.any():
                    drop_addrs.append(a[zap])
                    if not v.anonymous:
                        drop_rows.append((a[zap], want[zap]))
        if drop_addrs:
            r = from_pages(np.sort(np.concatenate(drop_addrs)))
            failed = _drop(freezer, r)
            res.pages_dropped = (ranges.total(r) - ranges.total(failed)) // PAGE
            if len(failed):  # write the wanted content (zero, or the file's) where madvise refused
                fa = page_addrs(failed)
                want = np.zeros((len(fa), PAGE), dtype=np.uint8)
                for addrs, rows in drop_rows:
                    idx = np.searchsorted(addrs, fa)
                    ok = (idx < len(addrs)) & (addrs[np.minimum(idx, len(addrs) - 1)] == fa)
                    want[ok] = rows[idx[ok]]
                mem.write(fa, want)
                res.pages_written += len(fa)
    finally:
        mem.close()


def _check_processes(images_dir: str, members: list[Member]) -> list[tuple[Member, list[Iteration]]]:
    """Each process of the frozen tree with its chain; LayoutMismatch when the set of processes differs from the
    checkpoint's (by vpid and identity)."""
    vpids = tree_vpids(images_dir)
    now = {m.vpid: m for m in members}
    if sorted(now) != sorted(vpids):
        gone, new = sorted(set(vpids) - set(now)), sorted(set(now) - set(vpids))
        what = "; ".join(x for x in (gone and f"gone since: {gone}", new and f"new since: {new}") if x)
        raise LayoutMismatch(f"the tree's processes changed ({what} (vpids)): memory cannot be rolled back in "
                             "place", pid=members[0].pid, errno=errno.ESRCH)
    out = []
    for v in vpids:
        m = now[v]
        chain = load_chain(images_dir, v)
        if chain[0].meta is not None and not same_process(chain[0].meta, m.start_ticks):
            raise LayoutMismatch(f"{images_dir} is a checkpoint of another process, not of pid {m.pid} (vpid {v})",
                                 pid=m.pid, errno=errno.ESRCH)
        out.append((m, chain))
    return out


def restore_memory(pid: int, images_dir: str, single: bool = False) -> RollbackResult:
    """Roll the memory of every process of the tree rooted at ``pid`` (``single``: that process alone) back to
    the checkpoint in ``images_dir`` (the top of its chain). Every check passes before any page is written."""
    t0 = time.perf_counter()
    check_alive(pid)
    res = RollbackResult(pid, os.path.abspath(images_dir), False)
    with keeper.pid_lock(pid):
        t_frozen = time.perf_counter()
        fr = freeze.TreeFreezer(pid, single)  # an already stopped process stays stopped
        ks: KeeperSession | None = None
        try:
            todo = [(m, chain, check_layout(m.pid, chain[0], read_maps(m.pid)))
                    for m, chain in _check_processes(images_dir, fr.members)]
            top_id = todo[0][1][0].iteration_id
            trackers: dict[str, Tracker] = {}
            ks = KeeperSession.connect(pid)
            if ks is not None and top_id and ks.status().get("iteration") == top_id:
                trackers = ks.take()
                res.tracked = all(m.key in trackers for m, _, _ in todo)
            elif ks is not None:
                ks.close()
                ks = None
            for m, chain, vmas in todo:
                tr = trackers.get(m.key)
                if tr is not None:
                    candidates = tr.harvest().changed()
                else:
                    candidates = ranges.from_pairs([(v.start, v.end) for v in vmas])
                _rollback(m.pid, fr.frozen[m.pid], chain, vmas, candidates, res)
            if ks is not None:
                for tr in trackers.values():
                    tr.harvest()  # our own writes and drops: the memory equals the checkpoint again
                ks.checkin(list(trackers.values()), top_id, todo[0][1][0].path, kind="restore")
            res.processes = len(todo)
        finally:
            if ks is not None:
                ks.close()  # a checkout without checkin: the keeper ends tracking
            fr.thaw()
            res.frozen_s = time.perf_counter() - t_frozen
    res.total_s = time.perf_counter() - t0
    return res
