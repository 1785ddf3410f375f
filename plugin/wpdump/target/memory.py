"""Every read of a target's memory, none changing it: page-aligned buffers, process_vm_readv or /proc/PID/mem
page by page as /proc/PID/pagemap allows (Reader), verify's own /proc/PID/mem read (read_mem_span), and the
content of a mapped file (pread_into)."""

from __future__ import annotations

import errno
import mmap
import os

import numpy as np

from .. import ranges
from ..errors import NoSuchProcess, TargetExeced, UnreadableMemory, WpdumpError, no_such_process
from ..ranges import PAGE, in_ranges, page_addrs
from . import uffd
from .process import check_alive, open_proc
from .vmas import Vma, read_maps

HUGE = 2 << 20


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A page-aligned uint8 buffer (its own anonymous mapping, asked to use transparent huge pages).

    Page alignment matters: process_vm_readv into a buffer that is not page-aligned (malloc's, so
    numpy's) copies every page across two destination pages and runs at a third of the speed; O_DIRECT
    writes need it too. Huge pages make the first touch cheap: 16 MiB fault in 1.3 ms instead of 9 ms.
    """
    size = max(PAGE, -(-nbytes // PAGE) * PAGE)
    if size >= HUGE:
        size = -(-size // HUGE) * HUGE
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if size >= HUGE and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return np.frombuffer(m, dtype=np.uint8)[:nbytes]


# /proc/PID/pagemap entry bits (admin-guide/mm/pagemap.rst)
PM_PRESENT = np.uint64(1 << 63)
PM_FILE = np.uint64(1 << 61)  # a file page or shared anonymous (shmem): pins never copy it
PM_GUARD = np.uint64(1 << 58)
PM_EXCLUSIVE = np.uint64(1 << 56)  # mapped by this process alone
# pagemap is read across gaps of fewer pages than this (an entry costs ~35 ns, a pread ~1 µs)
COVER_GAP = 32 * PAGE


def _runs_of(addrs: np.ndarray, sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The runs of selected pages consecutive both in memory and in ``addrs``: (n×2 ranges, index in ``addrs``
    of each run's first page)."""
    idx = np.flatnonzero(sel)
    if not len(idx):
        return ranges.EMPTY.copy(), np.zeros(0, dtype=np.int64)
    a = addrs[idx]
    brk = np.flatnonzero((np.diff(a) != PAGE) | (np.diff(idx) != 1)) + 1
    first = np.concatenate(([0], brk))
    last = np.concatenate((brk - 1, [len(a) - 1]))
    return np.column_stack((a[first], a[last] + PAGE)).astype(np.uint64), idx[first]


class Reader:
    """Reads a target's pages without changing its memory (docs/kernel.md rule 18).

    process_vm_readv is fast but pins what it reads, which makes the kernel copy (un-share) anonymous pages
    shared copy-on-write with another process, and it fails on VMAs without read permission. /proc/PID/mem
    does neither, at about half the speed. So /proc/PID/pagemap decides page by page: process_vm_readv for
    present pages this process maps alone (and file or shmem pages, which pins never copy), /proc/PID/mem for
    the rest and for whatever process_vm_readv cannot read. A page that /proc/PID/mem cannot read either is
    lost if its VMA is gone (unmapped meanwhile) or turned into a guard page, else UnreadableMemory.
    Safe to share between threads. A running target that forks between a batch's pagemap read and its
    process_vm_readv still has that batch's pages un-shared (docs/kernel.md rule 24).
    """

    def __init__(self, pid: int, unreadable: np.ndarray = ranges.EMPTY, *, pin: bool = True) -> None:
        """``unreadable``: ranges known to lack read permission (read through /proc/PID/mem straight away);
        ``pin=False``: never use process_vm_readv."""
        self.pid, self.pin = pid, pin
        self.unreadable = ranges.merge(unreadable) if len(unreadable) else ranges.EMPTY
        self.mem = open_proc(pid, "mem")
        try:
            self.pagemap = open_proc(pid, "pagemap")
        except BaseException:
            os.close(self.mem)
            raise

    def close(self) -> None:
        for fd in (self.mem, self.pagemap):
            if fd >= 0:
                os.close(fd)
        self.mem = self.pagemap = -1

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_into(self, r: np.ndarray, out: np.ndarray) -> np.ndarray | None:
        """Read ranges ``r`` back to back into ``out``.

        Returns None when every page was read, else a mask with one bool per page of ``r``: False for a page
        whose VMA vanished meanwhile (unmapped, or made a guard page: the next harvest reports it); its part
        of ``out`` holds garbage. Raises UnreadableMemory for a mapped page that cannot be read.
        """
        r = np.ascontiguousarray(r, dtype=np.uint64)
        total = ranges.total(r)
        if total > len(out):
            raise ValueError(f"{total} bytes to read into a buffer of {len(out)}")
        if not total:
            return None
        npages = ((r[:, 1] - r[:, 0]) // PAGE).astype(np.int64)
        ok, addrs = self._pinnable(r)
        slow = ~ok
        if ok.all():  # the common case: one process_vm_readv a batch, no per-page arrays
            fails = self._readv(r, np.cumsum(npages) - npages, out, back_to_back=True)
        elif ok.any():
            addrs = page_addrs(r) if addrs is None else addrs
            fails = self._readv(*_runs_of(addrs, ok), out)
        else:
            fails = []
        for a, b in fails:
            slow[a:b] = True  # not readable this way: through /proc/PID/mem
        if not slow.any():
            return None
        addrs = page_addrs(r) if addrs is None else addrs
        lost = np.zeros(len(addrs), dtype=bool)
        for a, b in self._pread(*_runs_of(addrs, slow), out):
            lost[a:b] = True
        return ~lost if lost.any() else None

    def _pinnable(self, r: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Which pages of ``r`` process_vm_readv may read: present, and mapped by this process alone or not
        anonymous. Also their addresses when it had to compute them (else None)."""
        n = ranges.total(r) // PAGE
        if not self.pin:
            return np.zeros(n, dtype=bool), None
        addrs = None
        if len(r) < 2 or bool((r[1:, 0] >= r[:-1, 1]).all()):  # in order (batches are): one native call
            ok = uffd.pagemap_match(self.pagemap, r, COVER_GAP, int(PM_PRESENT), int(PM_EXCLUSIVE | PM_FILE))
            if ok is None:  # the mm is gone: /proc/PID/mem will say so
                return np.zeros(n, dtype=bool), None
        else:
            cov = ranges.cover(ranges.merge(r), COVER_GAP)
            pages = ((cov[:, 1] - cov[:, 0]) // PAGE).astype(np.int64)
            ent = np.zeros(int(pages.sum()), dtype=np.uint64)
            try:
                got = uffd.pread_ranges(self.pagemap, cov // PAGE * 8, ent.view(np.uint8), pid=self.pid)
            except WpdumpError:
                got = -1
            if got != len(ent) * 8:  # the mm is gone: /proc/PID/mem will say so
                return np.zeros(n, dtype=bool), None
            addrs = page_addrs(r)
            k = np.searchsorted(cov[:, 0], addrs, side="right") - 1
            e = ent[(np.cumsum(pages) - pages)[k] + ((addrs - cov[k, 0]) // PAGE).astype(np.int64)]
            ok = ((e & PM_PRESENT) != 0) & ((e & (PM_EXCLUSIVE | PM_FILE)) != 0)
        u = self.unreadable
        if len(u):
            k = np.searchsorted(u[:, 1], r[:, 0], side="right")
            if ((k < len(u)) & (u[np.minimum(k, len(u) - 1), 0] < r[:, 1])).any():  # some range meets them
                addrs = page_addrs(r) if addrs is None else addrs
                ok &= ~in_ranges(addrs, u)
        return ok, addrs

    def _readv(
        self, rr: np.ndarray, first: np.ndarray, out: np.ndarray, back_to_back: bool = False,
    ) -> list[tuple[int, int]]:
        """process_vm_readv runs ``rr`` (run i to page ``first[i]`` of ``out``; ``back_to_back``: each run right
        after the one before, read into one local iovec: 1024 local iovecs a call made scattered single pages
        25-35 % slower here); the page spans it could not read."""
        dst = first.astype(np.uint64) * np.uint64(PAGE)
        npages = ((rr[:, 1] - rr[:, 0]) // PAGE).astype(np.int64)
        cum = np.cumsum(npages * PAGE)
        failed = []
        i = 0
        while i < len(rr):
            try:
                if back_to_back:
                    got = uffd.read_ranges(self.pid, rr[i:], out[int(dst[i]) :])
                else:
                    got = uffd.read_ranges(self.pid, rr[i:], out, dst[i:])
            except WpdumpError as e:
                if e.errno not in (errno.EFAULT, errno.ENOMEM, errno.EIO):
                    raise
                got = 0
            done = (int(cum[i - 1]) if i else 0) + got
            if done >= int(cum[-1]):
                break
            k = int(np.searchsorted(cum, done, side="right"))
            skip = (done - (int(cum[k - 1]) if k else 0)) // PAGE
            failed.append((int(first[k]) + skip, int(first[k] + npages[k])))
            i = k + 1
        return failed

    def _pread(self, rr: np.ndarray, first: np.ndarray, out: np.ndarray) -> list[tuple[int, int]]:
        """Read runs ``rr`` through /proc/PID/mem (run i to page ``first[i]`` of ``out``); the page spans lost."""
        lost: list[tuple[int, int]] = []
        maps: tuple[np.ndarray, list[Vma]] | None = None
        retried = -1
        cum = np.cumsum((rr[:, 1] - rr[:, 0]).astype(np.int64))
        pos = 0  # bytes of the runs, back to back, read or given up
        while pos < int(cum[-1]):
            i = int(np.searchsorted(cum, pos, side="right"))  # the run holding ``pos``
            at = int(rr[i, 1]) - (int(cum[i]) - pos)
            sub = rr[i:].copy()
            sub[0, 0] = at
            dst = first[i:].astype(np.uint64) * np.uint64(PAGE)
            dst[0] += np.uint64(at - int(rr[i, 0]))
            try:
                got = uffd.pread_ranges(self.mem, sub, out, dst, pid=self.pid, what="read /proc/PID/mem")
            except WpdumpError as e:
                if e.errno != errno.EIO:
                    raise
                got = -1
            if got > 0:  # all, or short: go on from where it stopped, to learn why
                pos += got
                continue
            if got == 0:
                raise self._gone()
            pos -= at % PAGE  # the page that failed, whole
            at -= at % PAGE
            end = int(rr[i, 1])
            if maps is None or retried == at:
                maps = self._maps()
            v = _vma_at(maps, at)
            if v is None:  # unmapped meanwhile: lose the pages up to the next VMA
                k = int(np.searchsorted(maps[0], at, side="right"))
                stop = min(end, int(maps[0][k])) if k < len(maps[0]) else end
            elif self._guard(at):  # made a guard page meanwhile: lose this page alone
                stop = at + PAGE
            elif retried != at:  # mapped: read it again (it may have been remapped meanwhile)
                retried = at
                continue
            else:
                raise UnreadableMemory(at, min(end, v.end), str(v), pid=self.pid, errno=errno.EIO)
            page = int(first[i]) + (at - int(rr[i, 0])) // PAGE
            lost.append((page, page + (stop - at) // PAGE))
            pos += stop - at
        return lost

    def _maps(self) -> tuple[np.ndarray, list[Vma]]:
        """The target's VMAs now (their starts, and the VMAs); the target gone or without memory raises."""
        vmas = read_maps(self.pid)
        if not vmas:
            raise self._gone()
        return np.array([v.start for v in vmas], dtype=np.uint64), vmas

    def _guard(self, addr: int) -> bool:
        try:
            raw = os.pread(self.pagemap, 8, addr // PAGE * 8)
        except OSError:
            return False
        return len(raw) == 8 and bool(np.frombuffer(raw, dtype=np.uint64)[0] & PM_GUARD)

    def _gone(self) -> WpdumpError:
        """The error for a memory that reads as end of file: the process exited, or exec'd a new image."""
        try:
            check_alive(self.pid)
        except NoSuchProcess as e:
            return e
        return TargetExeced(f"pid {self.pid}: its memory was replaced (execve?) while pages were read",
                            pid=self.pid, errno=errno.ESRCH)


def _vma_at(maps: tuple[np.ndarray, list[Vma]], addr: int) -> Vma | None:
    k = int(np.searchsorted(maps[0], addr, side="right")) - 1
    return maps[1][k] if k >= 0 and addr < maps[1][k].end else None


def read_into(pid: int, r: np.ndarray, out: np.ndarray) -> np.ndarray | None:
    """Read ranges ``r`` of ``pid`` back to back into ``out`` with a Reader of its own (see Reader.read_into)."""
    with Reader(pid) as reader:
        return reader.read_into(r, out)


def pread_into(fd: int, off: int, out: np.ndarray) -> None:
    """Fill ``out`` from the file at ``off``; what lies beyond its end stays as it is (zero)."""
    view = memoryview(out)
    pos = 0
    while pos < len(out):
        got = os.preadv(fd, [view[pos:]], off + pos)
        if got <= 0:
            return
        pos += got


def read_mem_span(pid: int, fd: int, addr: int, out: np.ndarray) -> np.ndarray:
    """pread [addr, addr + len(out)) of /proc/PID/mem (``fd``) into ``out``; a mask of the pages that could be
    read, the others zeroed (verify's own read: it counts what it cannot read, where Reader raises)."""
    n = len(out) // PAGE
    ok = np.ones(n, dtype=bool)
    view = memoryview(out)
    pos = 0
    while pos < len(out):
        try:
            got = os.preadv(fd, [view[pos:]], addr + pos)
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise no_such_process(pid, e.errno) from None
            if e.errno not in (errno.EIO, errno.EFAULT, errno.ENOMEM, errno.EPERM):
                raise
            got = 0
        if got > 0:
            pos += got
            continue
        k = pos // PAGE  # this page cannot be read: skip it
        ok[k] = False
        out[k * PAGE : (k + 1) * PAGE] = 0
        pos = (k + 1) * PAGE
    return ok
