"""One iteration (pre-dump or final dump): harvest the tracker, copy the pages, write CRIU images atomically.

An iteration's pagemap lists every non-zero page of the dumped memory: PE_PRESENT for the pages in its
pages file (changed since the parent, or new), PE_PARENT for pages unchanged since the parent.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from . import freeze, images, imgdir, keeper, ranges, uffd
from .chain import META_FILE, META_FORMAT, Iteration, boot_id, check_parent, load_parent, uptime_us
from .errors import UnreadableMemory, WpdumpError
from .pagecopy import Reader, aligned_buffer
from .process import check_alive
from .ranges import PAGE, from_pages, in_ranges, page_addrs
from .session import Tracking
from .tracker import Harvest, gc_paused
from .vmas import Policy, Vma, read_maps

log = logging.getLogger("wpdump.iteration")

# Pages are read from the target in batches of at most BATCH_BYTES, by READERS threads at once, into one of
# BUFFERS buffers, while a thread writes the batches read before in order: wpdump's memory for page data is
# bounded by BUFFERS * BATCH_BYTES. Two readers: reading scattered pages is CPU-bound (page table walks, a
# syscall per isolated page: pagecopy.Reader), process_vm_readv 2.8-3.3 GB/s with one thread, 5 GB/s with two
# on this 2-CPU VM (8 GiB, 1 % random pages).
BATCH_BYTES = 8 << 20
MIN_BATCH_BYTES = 1 << 20
READERS = min(2, os.cpu_count() or 1)
BUFFERS = READERS + 2
IOV_MAX = 1024
PAGES_ID = 1
_POLICY_NAMES = {p: p.value for p in Policy}  # Enum.value is a slow descriptor: 30,000 VMAs take 0.1 s

Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


@dataclass
class IterationResult:
    """What one iteration wrote and how long it took (seconds)."""

    images_dir: str
    kind: str  # "pre-dump" or "dump"
    iteration: str
    parent: str | None
    incremental: bool
    pages_scanned: int = 0
    pages_written: int = 0
    pages_parent: int = 0
    pages_zeroed: int = 0
    bytes_written: int = 0
    harvest_s: float = 0.0
    copy_s: float = 0.0
    write_s: float = 0.0
    freezing_s: float = 0.0
    frozen_s: float = 0.0
    total_s: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


# ---- laying out and writing the images ----


def _batch_size(total: int) -> int:
    """Bytes per batch: at most BATCH_BYTES, and small copies cut in about four, so that writing the first
    batch overlaps reading the next."""
    size = min(max(-(-total // 4), MIN_BATCH_BYTES), BATCH_BYTES, max(total, PAGE))
    return -(-size // PAGE) * PAGE


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for ``fd``; returns whether it is on (False where the filesystem refuses it)."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | os.O_DIRECT) if on else (flags & ~os.O_DIRECT))
        return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
    except OSError:
        return False


class _Writer:
    """Appends batches of pages to the pages file in a thread, in order, while the next batches are read.

    Writes use O_DIRECT where the filesystem allows it: the pages go from wpdump's buffer to the disk with no
    second copy into the page cache, and this VM's disk takes them at 1.4-3.3 GB/s against 0.3-1.8 GB/s
    buffered + fsync. The buffers are page-aligned and every write is whole pages, as O_DIRECT needs; an
    EINVAL turns O_DIRECT off and the write is retried buffered.
    """

    def __init__(self, fd: int, what: str) -> None:
        self.fd, self.what = fd, what
        self.direct = _set_direct(fd, True)
        self.todo: queue.SimpleQueue = queue.SimpleQueue()
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="wpdump-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.todo.get()
            if item is None:
                return
            slot, read = item  # read: the Future of _read_batch's result
            if self.error is None:
                try:
                    self._write(read.result()[0])
                except BaseException as e:  # handed to the caller
                    self.error = e
            self.done.put(slot)

    def _write(self, views: list[memoryview]) -> None:
        i = 0
        while i < len(views):
            try:
                n = os.writev(self.fd, views[i : i + IOV_MAX])
            except OSError as e:
                if e.errno == errno.EINVAL and self.direct:
                    self.direct = _set_direct(self.fd, False)
                    if not self.direct:
                        continue
                raise
            if n <= 0:
                raise OSError(errno.EIO, "write wrote nothing")
            while n:
                if n >= len(views[i]):
                    n -= len(views[i])
                    i += 1
                else:
                    views[i] = views[i][n:]
                    n = 0

    def wait(self) -> int:
        """The next buffer slot written (in submission order); raises the writer's error, described."""
        slot = self.done.get()
        if self.error is not None:
            e = self.error
            if isinstance(e, OSError):
                raise imgdir.describe_os_error(e, self.what) from None
            raise e
        return slot

    def close(self) -> None:
        self.error = self.error or _Stopped()  # skip what is still queued
        self.todo.put(None)
        self.thread.join()
        if self.direct:
            _set_direct(self.fd, False)


class _Stopped(Exception):
    pass


_arena_lock = threading.Lock()
_arena: np.ndarray | None = None


def _take_arena(nbytes: int) -> tuple[np.ndarray, bool]:
    """Buffer space for one copy_and_write: the process's arena, kept from one iteration to the next (at most
    BUFFERS * BATCH_BYTES), or a private one while another thread uses it. Fresh memory is slow to touch in
    this VM (0.1-3 ms per MiB: free page reporting gives freed memory back to the host), so an iteration
    should not allocate its buffers anew. Returns (buffer, whether it is the shared arena: release it)."""
    global _arena
    if not _arena_lock.acquire(blocking=False):
        return aligned_buffer(nbytes), False
    if _arena is None or len(_arena) < nbytes:
        _arena = None
        _arena = aligned_buffer(max(nbytes, min(BUFFERS * BATCH_BYTES, 2 * nbytes)))
    return _arena[:nbytes], True


def _read_batch(reader: Reader, batch: np.ndarray, buf: np.ndarray, anon: np.ndarray) -> tuple[list, np.ndarray, int]:
    """Read ``batch`` into ``buf``; returns the views of ``buf`` to write, the ranges they hold, and the number
    of pages dropped because they read all zero in an anonymous VMA (absent means zero)."""
    n = ranges.total(batch)
    out = buf[:n]
    keep = reader.read_into(batch, out)  # None, or False for pages that vanished meanwhile
    rows = out.reshape(-1, PAGE)
    held = batch
    if keep is not None:
        held = ranges.subtract(batch, from_pages(page_addrs(batch)[~keep]))
    zero_count = 0
    if len(anon):
        zero, nz = uffd.zero_pages(rows)
        if nz:
            if keep is not None:
                zero &= keep
            cand = np.flatnonzero(zero)
            addrs = page_addrs(batch)[cand]
            inside = in_ranges(addrs, anon)
            if inside.any():
                keep = np.ones(len(rows), dtype=bool) if keep is None else keep
                keep[cand[inside]] = False
                zero_count = int(inside.sum())
                held = ranges.subtract(held, from_pages(addrs[inside]))
    mv = memoryview(out)
    if keep is None:
        return [mv], held, 0
    edges = np.diff(np.concatenate(([0], keep.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()
    return [mv[s * PAGE : e * PAGE] for s, e in zip(starts, ends, strict=True)], held, zero_count


def copy_and_write(
    pid: int, copy: np.ndarray, anon: np.ndarray, fd: int, what: str, progress: Progress | None,
    unreadable: np.ndarray = ranges.EMPTY,
) -> tuple[np.ndarray, int, float, float]:
    """Read ``copy`` (sorted, merged ranges) from the target batch by batch and append the pages to ``fd``.

    READERS threads read batches (pagecopy.Reader: sharing left as it is; ``unreadable``: the ranges of VMAs
    without read permission) while a thread writes those read before (see _Writer). Pages of anonymous VMAs
    that read all zero are left out (absent means zero). Returns the ranges written, the pages dropped as zero,
    the seconds until every batch was read, and the seconds of writing after that (the two add up to the
    elapsed time).
    """
    total = ranges.total(copy)
    if not total:
        return ranges.EMPTY.copy(), 0, 0.0, 0.0
    limit = _batch_size(total)
    batches = ranges.batches(copy, limit)
    nbuf = min(BUFFERS, len(batches))
    arena, shared = _take_arena(nbuf * limit)
    try:
        bufs = [arena[i * limit : (i + 1) * limit] for i in range(nbuf)]
        with Reader(pid, unreadable) as reader:
            return _pipeline(reader, batches, bufs, anon, fd, what, progress, total)
    finally:
        if shared:
            _arena_lock.release()


def _pipeline(
    reader: Reader, batches: list[np.ndarray], bufs: list[np.ndarray], anon: np.ndarray, fd: int, what: str,
    progress: Progress | None, total: int,
) -> tuple[np.ndarray, int, float, float]:
    """copy_and_write's work: READERS threads read ``batches`` into ``bufs`` while a _Writer writes them in order."""
    free = list(range(len(bufs)))[::-1]
    pending: deque[int] = deque()  # bytes of each batch handed to the writer, in order
    reads: list[Future] = []
    read_end = [0.0]
    done = 0
    t_start = time.perf_counter()

    def read(batch: np.ndarray, slot: int) -> tuple[list, np.ndarray, int]:
        res = _read_batch(reader, batch, bufs[slot], anon)
        read_end[0] = max(read_end[0], time.perf_counter())
        return res

    pool = ThreadPoolExecutor(READERS, thread_name_prefix="wpdump-reader") if READERS > 1 and len(batches) > 1 else None
    try:
        writer = _Writer(fd, what)
        try:
            for batch in batches:
                if not free:
                    free.append(writer.wait())
                    done += pending.popleft()
                    if progress is not None:
                        progress(done, total)
                slot = free.pop()
                if pool is not None:
                    fut = pool.submit(read, batch, slot)
                else:
                    fut = Future()
                    fut.set_result(read(batch, slot))
                reads.append(fut)
                pending.append(ranges.total(batch))
                writer.todo.put((slot, fut))
            while pending:
                writer.wait()
                done += pending.popleft()
                if progress is not None:
                    progress(done, total)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            writer.close()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    elapsed = time.perf_counter() - t_start
    copy_s = min(max(read_end[0] - t_start, 0.0), elapsed)
    parts = [f.result()[1] for f in reads]
    zero_pages = sum(f.result()[2] for f in reads)
    written = ranges.merge(np.concatenate(parts)) if parts else ranges.EMPTY.copy()
    return written, zero_pages, copy_s, elapsed - copy_s


def _write_images(
    st: imgdir.Staging, pid: int, h: Harvest, res: IterationResult, parent: np.ndarray | None,
    progress: Progress | None, frozen: Callable[[], None] | None,
) -> dict:
    """Write pages, pagemap, inventory and stats into the staging directory; returns the stats."""
    copy = h.copy_ranges()
    anon = ranges.from_pairs([(v.vma.start, v.vma.end) for v in h.vmas if v.vma.anonymous])
    unreadable = ranges.from_pairs([(v.vma.start, v.vma.end) for v in h.vmas if v.vma.perms[0] != "r"])
    pages_name = images.pages_file_name(PAGES_ID)
    fd = st.create(pages_name)
    try:
        written, zero_dropped, res.copy_s, res.write_s = copy_and_write(
            pid, ranges.merge(copy), anon, fd, os.path.join(st.dest, pages_name), progress, unreadable
        )
        if frozen is not None:
            frozen()  # every page is read: the target may run again while we fsync
        t0 = time.perf_counter()
        imgdir.fsync(fd, os.path.join(st.dest, pages_name))
    finally:
        os.close(fd)
    keep = h.unchanged(parent, written) if parent is not None and len(parent) else ranges.EMPTY
    entries = images.entries_from_ranges(written, keep)
    st.write_file(images.pagemap_file_name(pid), images.encode_pagemap(PAGES_ID, entries))
    res.pages_scanned = sum(v.vma.size for v in h.vmas) // PAGE
    res.pages_written = ranges.total(written) // PAGE
    res.pages_parent = ranges.total(keep) // PAGE
    res.pages_zeroed = ranges.total(h.zero_ranges()) // PAGE + zero_dropped
    res.bytes_written = ranges.total(written)
    stats = {
        "freezing_time": int(res.freezing_s * 1e6), "frozen_time": int(res.frozen_s * 1e6),
        "memdump_time": int((res.harvest_s + res.copy_s) * 1e6), "memwrite_time": int(res.write_s * 1e6),
        "pages_scanned": res.pages_scanned, "pages_skipped_parent": res.pages_parent,
        "pages_written": res.pages_written,
    }
    st.write_file(images.STATS_FILE, images.encode_stats(**stats))
    res.write_s += time.perf_counter() - t0
    return stats


def _meta_json(meta: dict) -> bytes:
    """meta.json, indented, with its "vmas" list (put last) on one line: json's C encoder does not indent,
    the Python one takes 0.1-0.3 s for 30,000 VMAs."""
    head = json.dumps({**{k: v for k, v in meta.items() if k != "vmas"}, "vmas": []}, indent=1)
    tail = '"vmas": []\n}'
    assert head.endswith(tail)
    return (head[: -len(tail)] + '"vmas": ' + json.dumps(meta["vmas"]) + "\n}").encode()


def _resolve_prev(dest: str, prev: str) -> str:
    """CRIU resolves --prev-images-dir relative to the images directory."""
    return prev if os.path.isabs(prev) else os.path.normpath(os.path.join(dest, prev))


def _check_readable(pid: int, vmas: list[Vma], allow_unreadable: bool, warnings: list[str]) -> None:
    """memfd_secret memory cannot be read by anyone: refuse to dump it, or (allowed) record it as lost."""
    for v in vmas:
        if not v.secret:
            continue
        text = f"pid {pid}: {v} is memfd_secret memory, which nothing can read"
        if not allow_unreadable:
            raise UnreadableMemory(
                v.start, v.end, str(v), f"{text}: refusing to write a dump without it (--allow-unreadable records "
                "it as lost)", pid=pid, errno=errno.EIO,
            )
        warnings.append(f"{text}: left out of the images, its content is lost")


@gc_paused()
def run(
    pid: int, images_dir: str, prev_images_dir: str | None = None, *, final: bool = False,
    leave_stopped: bool = False, keep_tracking: bool | None = None, progress: Progress | None = None,
    allow_userfaultfd_target: bool = False, allow_unreadable: bool = False,
) -> IterationResult:
    """Write one iteration of ``pid`` into ``images_dir`` (a pre-dump, or with ``final`` the frozen dump)."""
    t_start = time.perf_counter()
    st_target = check_alive(pid)
    dest = imgdir.check_destination(images_dir)
    parent: Iteration | None = None
    if prev_images_dir:
        parent = load_parent(_resolve_prev(dest, prev_images_dir), pid)
        check_parent(parent, pid, st_target.start_ticks)
    if keep_tracking is None:
        keep_tracking = not final
    res = IterationResult(dest, "dump" if final else "pre-dump", uuid.uuid4().hex, prev_images_dir, False)
    _check_readable(pid, read_maps(pid), allow_unreadable, [])  # before attaching: refuse early
    with keeper.pid_lock(pid), imgdir.Staging(dest) as st:
        tracking: Tracking | None = None
        thawed = True
        t_frozen = 0.0
        freezer: freeze.Freezer | None = None

        def thaw(done: bool = True) -> None:
            nonlocal thawed
            if not thawed:
                thawed = True
                res.frozen_s = time.perf_counter() - t_frozen
                if freezer is None:
                    return
                if done:
                    freezer.thaw(leave_stopped=leave_stopped)
                    return
                try:  # a failed dump resumes the target, even with leave_stopped
                    freezer.thaw()
                except WpdumpError as e:
                    log.warning("%s", e)

        try:
            tracking = Tracking(pid, st_target.start_ticks, parent, res.warnings, allow_userfaultfd_target)
            if final:
                t_frozen = time.perf_counter()
                thawed = False
                freezer = freeze.Freezer(pid)
                res.freezing_s = freezer.seconds
            t0 = time.perf_counter()
            h = tracking.harvest()
            res.harvest_s = time.perf_counter() - t0
            _check_readable(pid, h.unreadable, allow_unreadable, res.warnings)
            res.warnings.extend(h.warnings)
            res.incremental = tracking.incremental and parent is not None
            dump_uptime = uptime_us()
            stats = _write_images(
                st, pid, h, res, parent.ranges() if res.incremental else None, progress,
                thaw if final else None,
            )
            thaw()
            st.write_file(images.INVENTORY_FILE, images.encode_inventory(dump_uptime, pre_dump=not final))
            if prev_images_dir:
                st.symlink(prev_images_dir)
            res.total_s = time.perf_counter() - t_start
            meta = {
                "format": META_FORMAT, "pid": pid, "start_ticks": st_target.start_ticks, "boot_id": boot_id(),
                "iteration": res.iteration, "parent_iteration": parent.iteration_id if parent else None,
                "kind": res.kind, "incremental": res.incremental, "created": time.time(), "stats": stats,
                "result": res.as_dict(),
                # the dumped VMAs at harvest time: restore-memory checks the layout against them
                "vmas": [[v.vma.start, v.vma.end, v.vma.perms, v.vma.offset, v.vma.path, _POLICY_NAMES[v.policy]]
                         for v in h.vmas],
                "lost": [[v.start, v.end, v.path] for v in h.unreadable],
            }
            st.write_file(META_FILE, _meta_json(meta))
            st.commit()
        except BaseException:
            thaw(done=False)
            if tracking is not None:
                tracking.abandon()
            raise
        try:
            tracking.hand_back(res.iteration, dest, keep_tracking)
        except WpdumpError as e:  # the iteration itself is complete; the next one will be full
            res.warnings.append(f"tracking of pid {pid} ends: {e}")
    res.total_s = time.perf_counter() - t_start
    return res


def pre_dump(pid: int, images_dir: str, prev_images_dir: str | None = None, **kw) -> IterationResult:
    """One pre-dump iteration; the target keeps running (``wpdump pre-dump``)."""
    return run(pid, images_dir, prev_images_dir, final=False, **kw)


def dump(pid: int, images_dir: str, prev_images_dir: str | None = None, **kw) -> IterationResult:
    """The final iteration with every thread of the target stopped (``wpdump dump``)."""
    return run(pid, images_dir, prev_images_dir, final=True, **kw)


def untrack(pid: int) -> bool:
    """End tracking of ``pid`` (its keeper exits, the target runs unprotected); False if it was not tracked."""
    with keeper.pid_lock(pid):
        k = keeper.Keeper.connect(pid)
        if k is None:
            return False
        try:
            k.untrack()
        finally:
            k.close()
        return True


def status() -> list[dict]:
    """The keepers running: one dict per tracked pid."""
    out = []
    for pid in keeper.tracked_pids():
        k = keeper.Keeper.connect(pid)
        if k is None:
            continue
        try:
            out.append(k.status())
        except keeper.KeeperError:
            pass
        finally:
            k.close()
    return out
