"""The copy pipeline of an iteration: the pages to dump read from the target batch by batch (memory.Reader, by
READERS threads) while a thread appends the batches read before to the pages file, in order, with O_DIRECT
where the filesystem allows it. Pages of anonymous VMAs that read all zero are left out (absent means zero)."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

import numpy as np

from .. import ranges
from ..images import imgdir
from ..ranges import PAGE, from_pages, in_ranges, page_addrs
from ..target import uffd
from ..target.memory import Reader, aligned_buffer

# Pages are read from the target in batches of at most BATCH_BYTES, by READERS threads at once, into one of
# BUFFERS buffers, while a thread writes the batches read before in order: wpdump's memory for page data is
# bounded by BUFFERS * BATCH_BYTES. Two readers: reading scattered pages is CPU-bound (page table walks, a
# syscall per isolated page: memory.Reader), process_vm_readv 2.8-3.3 GB/s with one thread, 5 GB/s with two
# on this 2-CPU VM (8 GiB, 1 % random pages).
BATCH_BYTES = 8 << 20
MIN_BATCH_BYTES = 1 << 20
READERS = min(2, os.cpu_count() or 1)
BUFFERS = READERS + 2
IOV_MAX = 1024
# Copies up to this size are read, then written, in the calling thread: no hand-over between threads
SINGLE_BYTES = 2 << 20

Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


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


class _Job:
    """The pages file of one copy_and_write, as its write tasks see it.

    Writes use O_DIRECT where the filesystem allows it: the pages go from wpdump's buffer to the disk with no
    second copy into the page cache, and this VM's disk takes them at 1.4-3.3 GB/s against 0.3-1.8 GB/s
    buffered + fsync. The buffers are page-aligned and every write is whole pages, as O_DIRECT needs; an
    EINVAL turns O_DIRECT off and the write is retried buffered.
    """

    def __init__(self, fd: int, what: str) -> None:
        self.fd, self.what = fd, what
        self.direct = _set_direct(fd, True)
        self.stop = False  # a write failed, or the caller gave up: the batches still queued are skipped

    def write(self, views: list[memoryview]) -> None:
        """Append ``views`` (raises OSError, e.g. ENOSPC)."""
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

    def write_read(self, read: Future) -> None:
        """The write task of one batch: append what ``read`` (a Future of _read_batch's result) read."""
        if self.stop:
            raise _Stopped()
        try:
            self.write(read.result()[0])
        except BaseException:
            self.stop = True
            raise

    def close(self) -> None:
        if self.direct:
            _set_direct(self.fd, False)


class _Stopped(Exception):
    pass


def _described(f: Future, what: str) -> object:
    """``f``'s result; an OSError of a write becomes one line naming the file ``what``."""
    try:
        return f.result()
    except OSError as e:
        raise imgdir.describe_os_error(e, what) from None


# The reader and writer threads live as long as the process (started at the first copy that needs them):
# starting them for each iteration cost more than the overlap saved on small copies. A forked child has
# none of its parent's threads: it starts its own.
_pool_lock = threading.Lock()
_readers: ThreadPoolExecutor | None = None
_writer: ThreadPoolExecutor | None = None


def _pools() -> tuple[ThreadPoolExecutor | None, ThreadPoolExecutor]:
    """(READERS reader threads, or None for one reader: the caller reads; the one writer thread)."""
    global _readers, _writer
    with _pool_lock:
        if READERS > 1 and (_readers is None or _readers._max_workers != READERS):
            _readers = ThreadPoolExecutor(READERS, thread_name_prefix="wpdump-reader")
        if _writer is None:
            _writer = ThreadPoolExecutor(1, thread_name_prefix="wpdump-writer")
        return (_readers if READERS > 1 else None), _writer


def _forget_pools() -> None:
    global _readers, _writer, _pool_lock
    _readers = _writer = None
    _pool_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pools)


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

    READERS threads read batches (memory.Reader: sharing left as it is; ``unreadable``: the ranges of VMAs
    without read permission) while a thread writes those read before (see _Job); a copy of at most SINGLE_BYTES
    is read, then written, in this thread. Pages of anonymous VMAs
    that read all zero are left out (absent means zero). Returns the ranges written, the pages dropped as zero,
    the seconds until every batch was read, and the seconds of writing after that (the two add up to the
    elapsed time).
    """
    total = ranges.total(copy)
    if not total:
        return ranges.EMPTY.copy(), 0, 0.0, 0.0
    limit = total if total <= SINGLE_BYTES else _batch_size(total)
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


def _single(
    reader: Reader, batch: np.ndarray, buf: np.ndarray, anon: np.ndarray, fd: int, what: str,
    progress: Progress | None, total: int,
) -> tuple[np.ndarray, int, float, float]:
    """_pipeline of one batch, in this thread: read, then written."""
    t0 = time.perf_counter()
    views, held, zero_pages = _read_batch(reader, batch, buf, anon)
    t1 = time.perf_counter()
    job = _Job(fd, what)
    try:
        job.write(views)
    except OSError as e:
        raise imgdir.describe_os_error(e, what) from None
    finally:
        job.close()
    if progress is not None:
        progress(total, total)
    return ranges.merge(held), zero_pages, t1 - t0, time.perf_counter() - t1


def _pipeline(
    reader: Reader, batches: list[np.ndarray], bufs: list[np.ndarray], anon: np.ndarray, fd: int, what: str,
    progress: Progress | None, total: int,
) -> tuple[np.ndarray, int, float, float]:
    """copy_and_write's work: READERS threads read ``batches`` into ``bufs`` while the writer thread appends them
    in order (a small copy: read, then written, in this thread: the hand-overs would cost more than the
    overlap saves)."""
    if len(batches) == 1:
        return _single(reader, batches[0], bufs[0], anon, fd, what, progress, total)
    free = list(range(len(bufs)))[::-1]
    pending: deque[tuple[int, int, Future]] = deque()  # (slot, bytes, write) of each batch queued, in order
    futures: list[Future] = []
    reads: list[Future] = []
    read_end = [0.0]
    done = 0
    t_start = time.perf_counter()

    def read(batch: np.ndarray, slot: int) -> tuple[list, np.ndarray, int]:
        res = _read_batch(reader, batch, bufs[slot], anon)
        read_end[0] = max(read_end[0], time.perf_counter())
        return res

    def retire() -> None:
        nonlocal done
        slot, nbytes, wrote = pending.popleft()
        _described(wrote, what)
        free.append(slot)
        done += nbytes
        if progress is not None:
            progress(done, total)

    readers, writer = _pools()
    job = _Job(fd, what)
    try:
        for batch in batches:
            if not free:
                retire()
            slot = free.pop()
            if readers is not None:
                fut = readers.submit(read, batch, slot)
            else:
                fut = Future()
                try:
                    fut.set_result(read(batch, slot))
                except BaseException as e:
                    fut.set_exception(e)
            wrote = writer.submit(job.write_read, fut)
            futures += (fut, wrote)
            reads.append(fut)
            pending.append((slot, ranges.total(batch), wrote))
        while pending:
            retire()
    finally:
        job.stop = True  # on an error: what is still queued is skipped
        for f in futures:
            f.cancel()
        wait(futures)  # no thread may touch the buffers or the fd once we return
        job.close()
    elapsed = time.perf_counter() - t_start
    copy_s = min(max(read_end[0] - t_start, 0.0), elapsed)
    parts = [f.result()[1] for f in reads]
    zero_pages = sum(f.result()[2] for f in reads)
    written = ranges.merge(np.concatenate(parts)) if parts else ranges.EMPTY.copy()
    return written, zero_pages, copy_s, elapsed - copy_s
