"""The copy pipeline of an iteration: the pages to dump read from the target batch by batch (memory.Reader) by
the calling thread and a helper thread, each batch's write submitted with Linux AIO as soon as it is read (the
kernel writes while the next batches are read), in order, with O_DIRECT where the filesystem allows it. Without
AIO a writer thread appends the batches instead. Pages of anonymous VMAs that read all zero are left out (absent
means zero)."""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, wait

import numpy as np

from .. import ranges
from ..images import imgdir
from ..ranges import PAGE, from_pages, in_ranges, page_addrs
from ..target import uffd
from ..target.memory import Reader, aligned_buffer
from ..target.native import ffi, lib
from ..workers import Workers

# Pages are read from the target in batches of at most BATCH_BYTES, by READERS threads at once, into one of
# BUFFERS buffers, while the batches read before are written in order: wpdump's memory for page data is bounded
# by BUFFERS * BATCH_BYTES. Two readers: the calling thread and a helper reading every other batch (reading
# scattered pages is CPU-bound: a pagemap pread and a process_vm_readv iovec per isolated page). Measured here
# (2-CPU VM shared with other work, 1 GiB, best of 12): at 10 % random pages 66 ms against 88 ms with one
# reader; with two reader threads and a writer thread instead of AIO 67 ms, but at 3 % 5-15 % slower (three
# Python threads passing the GIL: a thread waited up to 0.7 ms for it after each batch).
BATCH_BYTES = 8 << 20
MIN_BATCH_BYTES = 1 << 20
READERS = min(2, os.cpu_count() or 1)
BUFFERS = READERS + 2
IOV_MAX = 1024
# The first batch of a pipeline is this small and each next one twice the one before (up to the batch size), so
# that writing starts soon: at 1 % of 1 GiB a first batch of 2.5 MiB kept the writer idle for 2.5 of 9 ms
FIRST_BATCH_BYTES = 256 << 10
USE_AIO = True  # False: the threaded writer (as where the kernel offers no AIO context)
# Copies up to this size are read, then written, in one batch
SINGLE_BYTES = 256 << 10

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


class _Writer:
    """Appends batches to a file in a thread of its own, in order, while the caller fills the next buffers (the
    CRIU hook's copy): ``todo`` takes (slot, Future whose result()[0] is the views to write), ``wait`` hands back
    the slots written, in order. ``threaded=False``: no thread, the caller writes with :meth:`write_now`."""

    def __init__(self, fd: int, what: str, threaded: bool = True) -> None:
        self.job, self.what = _Job(fd, what), what
        self.todo: queue.SimpleQueue = queue.SimpleQueue()
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        if threaded:
            self.thread = threading.Thread(target=self._run, name="wpdump-writer", daemon=True)
            self.thread.start()

    @property
    def direct(self) -> bool:
        return self.job.direct

    def _run(self) -> None:
        while True:
            item = self.todo.get()
            if item is None:
                return
            slot, read = item
            if self.error is None:
                try:
                    self.job.write(read.result()[0])
                except BaseException as e:  # handed to the caller
                    self.error = e
            self.done.put(slot)

    def write_now(self, views: list[memoryview]) -> None:
        """Write in the caller's thread; an OSError described."""
        try:
            self.job.write(views)
        except OSError as e:
            raise imgdir.describe_os_error(e, self.what) from None

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
        if self.thread is not None:
            self.error = self.error or _Stopped()  # skip what is still queued
            self.todo.put(None)
            self.thread.join()
        self.job.close()


def _described(f: Future, what: str) -> object:
    """``f``'s result; an OSError of a write becomes one line naming the file ``what``."""
    try:
        return f.result()
    except OSError as e:
        raise imgdir.describe_os_error(e, what) from None


# The reader and writer threads live as long as the process (started at the first copy that needs them):
# starting them for each iteration cost more than the overlap saved on small copies.
_readers: Workers | None = None
_writer = Workers(1, "wpdump-writer")


def _pools() -> tuple[Workers | None, Workers]:
    """(READERS reader threads, or None for one reader: the caller reads; the one writer thread)."""
    global _readers
    if READERS > 1 and (_readers is None or _readers.n != READERS):
        _readers = Workers(READERS, "wpdump-reader")
    return (_readers if READERS > 1 else None), _writer


def _forget_aio() -> None:
    global _aio_ctx
    _aio_ctx = None  # a child has no AIO context of its parent's


class _Aio:
    """The pages file's writes in flight, submitted with Linux AIO as each batch is read: with O_DIRECT the kernel
    writes while this thread reads the next batch, with no writer thread to wake (a Python thread waited up to
    0.7 ms for the GIL after each batch here). Without O_DIRECT a submission writes before it returns."""

    def __init__(self, ctx: int, job: _Job) -> None:
        self.ctx, self.job = ctx, job
        self.todo: dict[int, tuple[int, int, int, np.ndarray]] = {}  # request -> (slot, offset, bytes, iovecs)
        self.left: dict[int, int] = {}  # slot -> requests in flight
        self.next = next(_request_ids) << 20  # ids of requests unique to this copy
        self.error: OSError | None = None
        self.freed: list[int] = []  # slots whose requests ended at submission (handed out by reap)
        self._data = np.zeros(64, dtype=np.uint64)
        self._res = np.zeros(64, dtype=np.int64)

    def submit(self, slot: int, buf: np.ndarray, spans: np.ndarray, off: int) -> int:
        """Write the ``spans`` of ``buf`` at file offset ``off`` (IOV_MAX iovecs a request); returns the bytes."""
        iov = np.empty((len(spans), 2), dtype=np.uint64)
        iov[:, 0] = spans[:, 0].astype(np.uint64) + np.uint64(buf.ctypes.data)
        iov[:, 1] = (spans[:, 1] - spans[:, 0]).astype(np.uint64)
        total = 0
        self.left[slot] = 0
        for i in range(0, len(iov), IOV_MAX):
            part = iov[i : i + IOV_MAX]
            nbytes = int(part[:, 1].sum())
            rid, self.next = self.next, self.next + 1
            self.todo[rid] = (slot, off + total, nbytes, part)
            self.left[slot] += 1
            if self.error is None:
                err = lib.wpd_aio_pwritev(self.ctx, self.job.fd, ffi.cast("const uint64_t *", part.ctypes.data),
                                          len(part), off + total, rid)
            else:
                err = -errno.ECANCELED
            if err < 0:  # ended at submission (written in this thread, or failed)
                slot_free = self._done(rid, err)
                if slot_free >= 0:
                    self.freed.append(slot_free)
            total += nbytes
        return total

    def _done(self, rid: int, res: int) -> int:
        """Account for request ``rid`` ending with ``res``; returns its slot if that slot is now free, else -1."""
        if rid not in self.todo:  # not one of ours (cannot be: a failed copy destroys its context)
            return -1
        slot, off, nbytes, iov = self.todo.pop(rid)
        if res != nbytes and self.error is None and res != -errno.ECANCELED:
            try:  # O_DIRECT refused (EINVAL), or a short write: the rest in this thread, which raises the cause
                if res == -errno.EINVAL and self.job.direct:
                    self.job.direct = _set_direct(self.job.fd, False)
                    res = 0
                elif res < 0:
                    raise OSError(-res, os.strerror(-res))
                views = [memoryview(ffi.buffer(ffi.cast("char *", int(a)), int(n))) for a, n in iov.tolist()]
                self._pwrite(views, off, max(res, 0))
            except OSError as e:
                self.error = e
        self.left[slot] -= 1
        if self.left[slot]:
            return -1
        del self.left[slot]
        return slot

    def _pwrite(self, views: list[memoryview], off: int, skip: int) -> None:
        """Write ``views`` at ``off`` in this thread, the first ``skip`` bytes being written already."""
        pos = 0
        while views:
            n = len(views[0])
            if skip >= n:
                skip -= n
                pos += n
                views.pop(0)
                continue
            views[0] = views[0][skip:]
            pos += skip
            skip = 0
            got = os.pwritev(self.job.fd, views[:IOV_MAX], off + pos)
            if got <= 0:
                raise OSError(errno.EIO, "write wrote nothing")
            skip = got

    def reap(self, wait: bool) -> list[int]:
        """The slots whose writes all ended (at least one request waited for if ``wait`` and none ended yet)."""
        out, self.freed = self.freed, []
        if not self.todo:
            return out
        d, r = self._data, self._res
        n = lib.wpd_aio_wait(self.ctx, 1 if wait and not out else 0, len(d), ffi.cast("uint64_t *", d.ctypes.data),
                             ffi.cast("int64_t *", r.ctypes.data))
        if n < 0:
            raise OSError(-n, os.strerror(-n))
        freed = [self._done(int(rid), int(res)) for rid, res in zip(d[:n].tolist(), r[:n].tolist(), strict=True)]
        return out + [slot for slot in freed if slot >= 0]


_aio_ctx: int | None = None
_request_ids = itertools.count(1)


def _aio_context(shared: bool) -> tuple[int | None, bool]:
    """An AIO context: the process's own while it holds the arena (``shared``), else a new one (destroy it);
    (None, False) where the kernel has none to give (ENOSYS, aio-max-nr reached)."""
    global _aio_ctx
    if shared and _aio_ctx is not None:
        return _aio_ctx, False
    out = ffi.new("uint64_t *")
    if lib.wpd_aio_setup(4 * BUFFERS + 8, out) < 0:
        return None, False
    if shared:
        _aio_ctx = int(out[0])
        return _aio_ctx, False
    return int(out[0]), True


os.register_at_fork(after_in_child=_forget_aio)


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


def _read_batch(
    reader: Reader, batch: np.ndarray, buf: np.ndarray, anon: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Read ``batch`` into ``buf``; returns the parts of ``buf`` to write (n×2 byte offsets [start, end)), the
    ranges they hold, and the number of pages dropped because they read all zero in an anonymous VMA (absent
    means zero)."""
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
    if keep is None:
        return np.array([[0, n]], dtype=np.int64), held, 0
    edges = np.diff(np.concatenate(([0], keep.astype(np.int8), [0])))
    spans = np.column_stack((np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))) * PAGE
    return spans.astype(np.int64), held, zero_count


def _views(buf: np.ndarray, spans: np.ndarray) -> list[memoryview]:
    """The parts of ``buf`` that ``spans`` (byte [start, end) pairs) name."""
    mv = memoryview(buf)
    return [mv[a:b] for a, b in spans.tolist()]


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
    batches = ranges.batches(copy, limit, FIRST_BATCH_BYTES if limit < total else None)
    nbuf = min(BUFFERS, len(batches))
    arena, shared = _take_arena(nbuf * limit)
    ctx, own_ctx = (None, False) if len(batches) == 1 or not USE_AIO else _aio_context(shared)
    ok = False
    try:
        bufs = [arena[i * limit : (i + 1) * limit] for i in range(nbuf)]
        with Reader(pid, unreadable) as reader:
            if ctx is not None:
                out = _pipeline_aio(reader, batches, bufs, anon, fd, what, progress, total, ctx)
            else:
                out = _pipeline(reader, batches, bufs, anon, fd, what, progress, total)
        ok = True
        return out
    finally:
        if ctx is not None and (own_ctx or not ok):
            # io_destroy returns once every request of the context ended: after a failure (an interrupt may have
            # landed between a submission or a completion and its bookkeeping) nothing writes from the buffers
            # or into the file any more, whatever the bookkeeping says
            lib.wpd_aio_destroy(ctx)
            if not own_ctx:
                _forget_aio_context(ctx)
        if shared:
            _arena_lock.release()


def _forget_aio_context(ctx: int) -> None:
    global _aio_ctx
    if _aio_ctx == ctx:
        _aio_ctx = None


def _pipeline_aio(
    reader: Reader, batches: list[np.ndarray], bufs: list[np.ndarray], anon: np.ndarray, fd: int, what: str,
    progress: Progress | None, total: int, ctx: int,
) -> tuple[np.ndarray, int, float, float]:
    """copy_and_write's work with Linux AIO: this thread reads each batch and submits its write (see _Aio)."""
    t_start = time.perf_counter()
    job = _Job(fd, what)
    base = os.lseek(fd, 0, os.SEEK_CUR)
    # ext4 writes an O_DIRECT request that extends the file before io_submit returns: allocate the space first
    # (at most what is read: pages that read zero are left out, the file is cut to what was written)
    grown = job.direct and _preallocate(fd, base, total)
    aio = _Aio(ctx, job)
    free = list(range(len(bufs)))[::-1]
    nbytes: dict[int, int] = {}  # slot -> bytes of the batch it holds (for progress)
    parts: list[np.ndarray] = []
    zero_pages = 0
    off = base
    done = 0
    t_read = t_start
    helper = _pools()[0] if READERS > 1 else None  # reads every other batch while this thread reads one
    ahead: Future | None = None
    bytes_of: dict[int, int] = {}

    def slot_for(batch: np.ndarray) -> int:
        nonlocal done
        while not free:
            if not aio.todo and not aio.freed:  # cannot be: every slot not free has a request in flight
                raise RuntimeError("copy pipeline: no buffer free and no write in flight")
            for slot in aio.reap(True):
                free.append(slot)
                done += nbytes.pop(slot)
                if progress is not None:
                    progress(done, total)
        slot = free.pop()
        bytes_of[slot] = ranges.total(batch)
        return slot

    def write(slot: int, result: tuple[np.ndarray, np.ndarray, int]) -> None:
        nonlocal off, done, zero_pages
        spans, held, zeros = result
        parts.append(held)
        zero_pages += zeros
        if not len(spans):  # nothing to write: every page read zero or vanished
            free.append(slot)
            done += bytes_of[slot]
            return
        nbytes[slot] = bytes_of[slot]
        off += aio.submit(slot, bufs[slot], spans, off)

    try:
        k = 0
        while k < len(batches) and aio.error is None:
            slot = slot_for(batches[k])
            if helper is not None and k + 1 < len(batches):
                nxt = slot_for(batches[k + 1])
                ahead = helper.submit(_read_batch, reader, batches[k + 1], bufs[nxt], anon)
            write(slot, _read_batch(reader, batches[k], bufs[slot], anon))
            if ahead is not None:
                result, ahead = ahead.result(), None
                write(nxt, result)
                k += 1
            k += 1
        t_read = time.perf_counter()
        while aio.todo or aio.freed:
            for slot in aio.reap(True):
                done += nbytes.pop(slot)
                if progress is not None:
                    progress(done, total)
        if aio.error is not None:
            raise imgdir.describe_os_error(aio.error, what)
        if grown and off != base + total:
            try:
                os.ftruncate(fd, off)
            except OSError as e:
                raise imgdir.describe_os_error(e, what) from None
        os.lseek(fd, off, os.SEEK_SET)
    finally:
        if ahead is not None:  # this thread failed while the helper reads into a buffer
            wait([ahead])
        job.close()
    written = ranges.merge(np.concatenate(parts)) if parts else ranges.EMPTY.copy()
    elapsed = time.perf_counter() - t_start
    return written, zero_pages, t_read - t_start, elapsed - (t_read - t_start)


def _preallocate(fd: int, off: int, nbytes: int) -> bool:
    """Allocate [off, off + nbytes) of the file (its size grows to the end); False where that cannot be done
    (no fallocate there, or no room for it: the writes then say so, or fit once zero pages are left out)."""
    return lib.wpd_fallocate(fd, off, nbytes) == 0


def _single(
    reader: Reader, batch: np.ndarray, buf: np.ndarray, anon: np.ndarray, fd: int, what: str,
    progress: Progress | None, total: int,
) -> tuple[np.ndarray, int, float, float]:
    """_pipeline of one batch, in this thread: read, then written."""
    t0 = time.perf_counter()
    spans, held, zero_pages = _read_batch(reader, batch, buf, anon)
    views = _views(buf, spans)
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
        spans, held, zeros = _read_batch(reader, batch, bufs[slot], anon)
        res = _views(bufs[slot], spans), held, zeros
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
