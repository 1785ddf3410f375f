"""``wpdump verify -t PID``: the chain against a live process's memory (check.py checks its structure).

``verify_process`` stops the target (or takes it stopped), reconstructs every page of the chain's top and compares
it byte for byte with /proc/PID/mem. Pages the image does not list must read zero in anonymous and shared
anonymous (shmem) mappings, and equal the file in file mappings (read through /proc/PID/map_files). Pages no
page table maps and no swap entry holds (PAGEMAP_SCAN) in private mappings read zero or the file by definition:
those are counted as skipped instead of being read, so sparse reservations cost nothing.

The kernel itself writes each thread's rseq area (cpu_id_start, cpu_id, rseq_cs, node_id, mm_cid) whenever the
thread resumes on another CPU: a process that ran on after its dump differs there without having written a
byte. Those fields (found with PTRACE_GET_RSEQ_CONFIGURATION) are left out of the comparison, and counted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import ranges
from ..errors import ChainError, WpdumpError
from ..images import format as images
from ..images.chain import Iteration, load_chain, load_iteration, locate_pages, read_pages_into, tree_vpids
from ..ranges import PAGE, in_ranges, page_addrs
from ..target import freeze, uffd
from ..target.memory import pread_into, read_mem_span
from ..target.process import all_stopped, check_alive, open_mapped_file, open_proc
from ..target.vmas import KERNEL_VMAS, Vma, read_maps
from ..tracking import keeper

BATCH_BYTES = 64 << 20  # pages compared per step (two buffers of this size)
GAP_BYTES = 64 << 10  # unpopulated gaps up to this size are read along with their neighbours: fewer preads

# how a page the image does not list must read
_ZERO, _FILE, _SKIP = 0, 1, 2


class VerifyFailed(WpdumpError):
    """The chain is broken, or the process's memory differs from it; the message is a one-line summary."""


@dataclass
class Mismatch:
    """A page where the process and the image disagree."""

    addr: int
    kind: str  # "differs", "not mapped", "unreadable"
    vma: str | None  # the /proc/PID/maps line holding the page
    source: str  # the iteration directory that supplied the page, or "absent" (image says zero / file content)
    offset: int | None = None  # first differing byte in the page
    want: int | None = None  # that byte in the image
    got: int | None = None  # and in memory

    def __str__(self) -> str:
        where = f"in {self.vma}" if self.vma else "outside every VMA"
        src = f"from {self.source}" if self.source != "absent" else "absent from the image"
        detail = ""
        if self.offset is not None:
            detail = f", first at +{self.offset:#x}: image {self.want:#04x}, memory {self.got:#04x}"
        return f"{self.addr:#x} {self.kind} ({src}) {where}{detail}"


@dataclass
class VerifyResult:
    pid: int
    top: str
    levels: int
    pages_listed: int  # pages the chain's top lists
    pages_compared: int  # pages read from memory and compared
    pages_skipped: int  # unpopulated pages of private mappings: zero / file content by definition
    pages_unreadable: int  # unlisted pages memory cannot be read at (beyond the end of a mapped file, ...)
    mismatches: int
    first: list[Mismatch]
    seconds: float
    frozen_s: float
    was_stopped: bool
    notes: list[str] = field(default_factory=list)
    rseq_bytes_ignored: int = 0

    @property
    def ok(self) -> bool:
        return self.mismatches == 0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def summary(self) -> str:
        if self.ok:
            return (f"pid {self.pid} equals {self.top}: {self.pages_compared} pages compared "
                    f"({self.pages_listed} listed, {self.levels} levels), {self.seconds * 1e3:.0f} ms")
        m = self.first[0]
        return (f"pid {self.pid} differs from {self.top} in {self.mismatches} pages; first {m.addr:#x} {m.kind} "
                f"({'from ' + m.source if m.source != 'absent' else 'absent from the image'})")


def _kind(v: Vma) -> int:
    if v.path in KERNEL_VMAS:
        return _SKIP
    if v.anonymous:
        return _ZERO
    if not v.shared:
        return _FILE  # private file mapping (or private mapping of a memfd, /dev/zero): the object's content
    shmem = v.inode == 0 or not v.path.startswith("/") or v.path.startswith(("/memfd:", "/SYSV", "/dev/zero"))
    return _ZERO if shmem else _FILE


def _populated(pm_fd: int, vmas: list[Vma]) -> list[np.ndarray | None]:
    """Per VMA, its pages with a page table or swap entry, except guard markers and the zero page; None if
    unknown. One native loop of PAGEMAP_SCAN calls, one VMA each.

    In a private mapping every other page reads zero (anonymous) or the mapped file's content.
    """
    if pm_fd < 0 or not vmas:
        return [None] * len(vmas)
    spans = np.array([(v.start, v.end) for v in vmas], dtype=np.uint64)
    mask = uffd.PAGE_IS_PRESENT | uffd.PAGE_IS_SWAPPED | uffd.PAGE_IS_GUARD | uffd.PAGE_IS_PFNZERO
    got, counts, errs = uffd.scan_ranges(
        pm_fd, spans, np.full(len(vmas), mask, dtype=np.uint64), uffd.RegionBuffer(), flags=0, category_mask=0,
        category_anyof_mask=uffd.PAGE_IS_PRESENT | uffd.PAGE_IS_SWAPPED,
    )
    # guard markers cannot be read; the shared zero page reads zero (it maps no file content either)
    keep = (got["categories"] & np.uint64(uffd.PAGE_IS_GUARD | uffd.PAGE_IS_PFNZERO)) == 0
    rows = np.column_stack((got["start"], got["end"])).astype(np.uint64)
    ends = np.cumsum(counts).tolist()
    out: list[np.ndarray | None] = []
    for c, e, err in zip(counts.tolist(), ends, errs.tolist(), strict=True):
        if err:
            out.append(None)
        elif c == 0:
            out.append(ranges.EMPTY)
        else:
            r = rows[e - c : e][keep[e - c : e]]
            out.append(ranges.merge(r) if len(r) else ranges.EMPTY)
    return out


RSEQ_KERNEL_FIELDS = ((0, 16), (20, 28))  # cpu_id_start, cpu_id, rseq_cs (cleared); node_id, mm_cid


def _rseq_masks(areas: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for ptr, size in areas:
        for lo, hi in RSEQ_KERNEL_FIELDS:
            if lo < size:
                out.append((ptr + lo, ptr + min(hi, size)))
    return sorted(out)


class _Comparer:
    """Compares batches of pages of a stopped process with a chain, collecting mismatches."""

    def __init__(self, pid: int, chain: list[Iteration], vmas: list[Vma], kinds: list[int], max_report: int) -> None:
        self.pid, self.chain, self.vmas, self.kinds = pid, chain, vmas, kinds
        self.shared = chain[0].shared  # objects of shared mappings, stored once for the tree
        self.listed = chain[0].ranges() if self.shared is None else ranges.union(chain[0].ranges(),
                                                                                 self.shared.ranges())
        self.max_report = max_report
        self.first: list[Mismatch] = []
        self.mismatches = 0
        self.compared = 0
        self.unreadable = 0
        self.notes: list[str] = []
        self.file_fds: dict[int, int] = {}
        self.mem = np.empty(0, dtype=np.uint8)
        self.want = np.empty(0, dtype=np.uint8)
        self.mem_fd = -1
        self.batch_bytes = BATCH_BYTES
        self.masks: list[tuple[int, int]] = []  # byte ranges the kernel writes (rseq fields): not compared
        self.masked_bytes = 0  # of those, bytes that differed

    def _file_fd(self, vi: int) -> int:
        fd = self.file_fds.get(vi)
        if fd is None:
            v = self.vmas[vi]
            try:
                fd = open_mapped_file(self.pid, v.start, v.end, v.dev, v.inode, v.path)
            except OSError as e:
                self.notes.append(f"{v}: cannot open the mapped file ({e.strerror}): unlisted pages not checked")
                fd = -1
            self.file_fds[vi] = fd
        return fd

    def close(self) -> None:
        for fd in self.file_fds.values():
            if fd >= 0:
                os.close(fd)
        self.file_fds.clear()

    def _report(
        self, addrs: np.ndarray, kind: str, level: np.ndarray, vis: np.ndarray, offsets: np.ndarray | None = None,
        want: np.ndarray | None = None, got: np.ndarray | None = None,
    ) -> None:
        self.mismatches += len(addrs)
        for j in range(min(self.max_report, len(addrs))):
            lv, vi = int(level[j]), int(vis[j])
            self.first.append(Mismatch(
                addr=int(addrs[j]), kind=kind, vma=str(self.vmas[vi]) if vi >= 0 else None,
                source=self.chain[lv].path if lv >= 0 else "absent",
                offset=int(offsets[j]) if offsets is not None else None,
                want=int(want[j]) if want is not None else None, got=int(got[j]) if got is not None else None,
            ))
        if len(self.first) > 2 * self.max_report:  # keep the lowest addresses only
            self.first = sorted(self.first, key=lambda m: m.addr)[: self.max_report]

    def _apply_masks(self, addrs: np.ndarray, mem: np.ndarray, want: np.ndarray) -> None:
        """Make memory equal the image in the masked bytes, counting those that differed."""
        if not self.masks or not len(addrs):
            return
        lo, hi = int(addrs[0]), int(addrs[-1]) + PAGE
        for s, e in self.masks:
            if e <= lo or s >= hi:
                continue
            page = s & ~(PAGE - 1)
            row = int(np.searchsorted(addrs, page))
            if row >= len(addrs) or int(addrs[row]) != page or (e - 1) & ~(PAGE - 1) != page:
                continue
            a, b = row * PAGE + (s - page), row * PAGE + (e - page)
            self.masked_bytes += int((mem[a:b] != want[a:b]).sum())
            mem[a:b] = want[a:b]

    def not_mapped(self, addrs: np.ndarray, vis: np.ndarray) -> None:
        level, _ = locate_pages(self.chain, addrs)
        self._report(addrs, "not mapped", level, vis)

    def batch(self, parts: list[tuple[int, int, int]]) -> None:
        r = np.array([(s, e) for s, e, _ in parts], dtype=np.uint64)
        counts = ((r[:, 1] - r[:, 0]) // PAGE).astype(np.int64)
        n = int(counts.sum())
        if len(self.mem) < n * PAGE:
            self.mem = np.empty(n * PAGE, dtype=np.uint8)
            self.want = np.empty(n * PAGE, dtype=np.uint8)
        mem, want = self.mem[: n * PAGE], self.want[: n * PAGE]
        want[:] = 0
        addrs = page_addrs(r)
        vis = np.repeat(np.array([vi for _, _, vi in parts], dtype=np.int64), counts)
        readable = np.empty(n, dtype=bool)
        check = np.ones(n, dtype=bool)  # pages whose expected content is known
        row = 0
        for (s, _e, vi), c in zip(parts, counts.tolist(), strict=True):
            sl = slice(row * PAGE, (row + c) * PAGE)
            readable[row : row + c] = read_mem_span(self.pid, self.mem_fd, s, mem[sl])
            if self.kinds[vi] == _FILE:
                fd = self._file_fd(vi)
                if fd >= 0:
                    v = self.vmas[vi]
                    pread_into(fd, v.offset + (s - v.start), want[sl])
                else:
                    check[row : row + c] = False
            row += c
        listed = in_ranges(addrs, self.listed)
        level = np.full(n, -1, dtype=np.int64)
        if self.shared is not None:  # pages of shared mappings come from their object's image
            srows = np.flatnonzero(listed & self.shared.covers(addrs))
            if len(srows):
                found = self.shared.read_into(addrs[srows], want.reshape(n, PAGE), srows)
                level[srows[found]] = 0
            listed_own = listed & ~self.shared.covers(addrs)
        else:
            listed_own = listed
        rows = np.flatnonzero(listed_own)
        if len(rows):
            level[rows] = read_pages_into(self.chain, addrs[rows], want.reshape(n, PAGE), rows)
        check |= listed
        self._apply_masks(addrs, mem, want)
        m64, w64 = mem.view(np.uint64).reshape(n, PAGE // 8), want.view(np.uint64).reshape(n, PAGE // 8)
        diff = (m64 != w64).any(axis=1) & readable & check
        self.compared += int((readable & check).sum())
        unread = ~readable
        self.unreadable += int((unread & ~listed).sum())
        bad_unread = np.flatnonzero(unread & listed)
        bad = np.flatnonzero(diff)
        if len(bad_unread):
            self._report(addrs[bad_unread], "unreadable", level[bad_unread], vis[bad_unread])
        if len(bad):
            k = bad[: self.max_report]
            mb, wb = mem.reshape(n, PAGE)[k], want.reshape(n, PAGE)[k]
            off = np.argmax(mb != wb, axis=1) if len(k) else np.zeros(0, dtype=np.int64)
            ar = np.arange(len(k))
            self._report(addrs[bad], "differs", level[bad], vis[bad], off, wb[ar, off], mb[ar, off])


def _pid_in(path: str, pid: int) -> int | None:
    return pid if os.path.lexists(os.path.join(path, images.pagemap_file_name(pid))) else None


def _compare_stopped(cmp: _Comparer, pm_fd: int) -> int:
    """Compare every page of the stopped target's VMAs that can differ; returns the pages skipped."""
    listed = cmp.listed
    parts: list[tuple[int, int, int]] = []
    skipped = 0
    mapped = []
    # shared memory may hold content no page table of this process maps: read it all
    scan = [vi for vi, (v, kind) in enumerate(zip(cmp.vmas, cmp.kinds, strict=True))
            if kind != _SKIP and (not v.shared or kind == _FILE)]
    pops = dict(zip(scan, _populated(pm_fd, [cmp.vmas[vi] for vi in scan]), strict=True))
    for vi, (v, kind) in enumerate(zip(cmp.vmas, cmp.kinds, strict=True)):
        if kind == _SKIP:
            continue
        mapped.append((v.start, v.end))
        pop = pops.get(vi)
        todo = ranges.from_pairs([(v.start, v.end)])
        if pop is not None:
            todo = ranges.cover(ranges.union(pop, ranges.clip_sorted(listed, v.start, v.end)), GAP_BYTES + 1)
        skipped += (v.size - ranges.total(todo)) // PAGE
        parts.extend((int(s), int(e), vi) for s, e in todo)
    outside = ranges.subtract(listed, ranges.from_pairs(mapped))
    if len(outside):
        addrs = page_addrs(outside)
        starts = np.array([v.start for v in cmp.vmas], dtype=np.uint64)
        ends = np.array([v.end for v in cmp.vmas], dtype=np.uint64)
        j = np.searchsorted(starts, addrs, side="right") - 1
        vis = np.where((j >= 0) & (addrs < ends[np.maximum(j, 0)]), j, -1)  # a kernel VMA, or none
        cmp.not_mapped(addrs, vis)
    if parts:
        r = np.array([(s, e) for s, e, _ in parts], dtype=np.uint64)
        starts = np.array([v.start for v in cmp.vmas], dtype=np.uint64)
        for batch in ranges.batches(r, cmp.batch_bytes):
            vi = (np.searchsorted(starts, batch[:, 0], side="right") - 1).tolist()
            cmp.batch([(s, e, i) for (s, e), i in zip(batch.tolist(), vi, strict=True)])
    return skipped


def verify_process(
    pid: int, path: str, max_report: int = 10, batch_bytes: int = BATCH_BYTES, rseq: bool = True,
    vpid: int | None = None, frozen_by: freeze.Freezer | None = None,
) -> VerifyResult:
    """Compare the chain whose top is ``path`` with the memory of ``pid``, every page.

    The target is stopped with SIGSTOP for the comparison and resumed afterwards (also on errors), unless every
    thread was stopped already: then it is left stopped. Raises ChainError if the chain itself is broken.
    With ``rseq`` the fields of the threads' rseq areas the kernel writes are not compared (see the module).
    """
    t0 = time.perf_counter()
    max_report = max(1, max_report)
    check_alive(pid)
    chain = load_chain(path, vpid if vpid is not None else _pid_in(path, pid))
    notes = []
    meta = chain[0].meta
    if (vpid is None and chain[0].pid != pid) or (meta and meta.get("pid") not in (None, pid)):
        notes.append(f"{path} is an image of pid {meta.get('pid') if meta else chain[0].pid}, compared with pid {pid}")
    with contextlib.ExitStack() as stack:
        mem_fd = open_proc(pid, "mem")
        stack.callback(os.close, mem_fd)
        try:
            pm_fd = open_proc(pid, "pagemap")
            stack.callback(os.close, pm_fd)
        except WpdumpError:
            pm_fd = -1
        if frozen_by is None:
            stack.enter_context(keeper.pid_lock(pid))  # no iteration may stop or resume the target meanwhile
            was_stopped = all_stopped(pid)
            freezer = freeze.Freezer(pid)  # an already stopped target stays stopped
            stack.callback(freezer.thaw)
        else:
            freezer, was_stopped = frozen_by, False
        t_frozen = time.perf_counter()
        vmas = read_maps(pid)
        cmp = _Comparer(pid, chain, vmas, [_kind(v) for v in vmas], max_report)
        stack.callback(cmp.close)
        cmp.mem_fd, cmp.notes, cmp.batch_bytes = mem_fd, notes, batch_bytes
        if rseq:
            cmp.masks = _rseq_masks(freezer.rseq_areas())
        skipped = _compare_stopped(cmp, pm_fd)
        frozen = time.perf_counter() - t_frozen
        check_alive(pid)  # killed meanwhile, its memory reads as nothing: no verdict
    if cmp.masked_bytes:
        notes.append(f"{cmp.masked_bytes} bytes of rseq fields differ, not compared: the kernel writes them when a "
                     "thread runs")
    return VerifyResult(
        pid=pid, top=os.path.normpath(path), levels=len(chain), pages_listed=ranges.total(cmp.listed) // PAGE,
        pages_compared=cmp.compared, pages_skipped=skipped, pages_unreadable=cmp.unreadable,
        mismatches=cmp.mismatches, first=sorted(cmp.first, key=lambda m: m.addr)[:max_report],
        seconds=time.perf_counter() - t0, frozen_s=0.0 if was_stopped else frozen, was_stopped=was_stopped,
        notes=notes, rseq_bytes_ignored=cmp.masked_bytes,
    )


def verify_tree(
    root: int, path: str, max_report: int = 10, single: bool = False,
) -> list[VerifyResult]:
    """Compare every process of the iteration at ``path`` with the live process it names (wpdump.json maps each
    vpid to a host pid and start time), the whole tree frozen at once; one result per process, root first.
    A process of the image that no longer runs, or runs as another, is a ChainError naming it."""
    vpids = tree_vpids(path)
    top = load_iteration(path, vpids[0]) if vpids else load_iteration(path)
    if single or top.meta is None or "processes" not in top.meta:
        return [verify_process(root, path, max_report)]
    procs = top.meta["processes"]
    check_alive(root)
    with keeper.pid_lock(root), freeze.TreeFreezer(root) as fr:
        live = {m.vpid: m for m in fr.members}
        out = []
        for v in vpids:
            want = procs.get(str(v))
            m = live.get(v)
            if want is None or m is None or m.start_ticks != want.get("start_ticks"):
                what = "is not running in the tree" if m is None else f"is now pid {m.pid}, another process"
                raise ChainError(f"process {v} of {path} (pid {want and want.get('pid')}) {what}", pid=root,
                                 errno=errno.ESRCH)
            out.append(verify_process(m.pid, path, max_report, vpid=v, frozen_by=fr.frozen[m.pid]))
    return out
