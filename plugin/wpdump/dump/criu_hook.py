"""``wpdump criu-hook``: CRIU's action script for ``criu dump`` of a process wpdump tracks.

At ``pre-dump`` (before CRIU freezes the tree) it removes the trackers' write-protect markers from empty
pages: CRIU would read each as a swapped page and dump it (docs/kernel.md rule 17). At ``post-dump``
(the tree still frozen) it harvests each process's final dirty set and rewrites CRIU's final
``pagemap-VPID.img``/``pages-N.img`` of every process of the tree (CRIU names them by the pid inside the
tree's pid namespace, as wpdump does) so that pages unchanged since wpdump's last pre-dump become
``PE_PARENT`` entries pointing into the wpdump chain (``parent`` link added): the final directory then
holds, for memory, only what changed since.

It fails safe, per process: whenever it cannot vouch for a process's result (not tracked, tracking lost,
chain broken, CRIU's pages disagree with the chain) it leaves that process's full images untouched, says
why, exits 0.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .. import ranges
from ..errors import ChainError, WpdumpError
from ..images import format as images
from ..images import imgdir
from ..images.chain import Iteration, load_chain, member_meta, read_image_file, read_meta, read_pages, same_process
from ..ranges import PAGE, in_ranges
from ..target import uffd
from ..target.memory import Reader
from ..target.process import check_alive
from ..tracking.session import KeeperSession
from ..tracking.tracker import Tracker
from . import pages as pagecopy

log = logging.getLogger("wpdump.criu_hook")

SAMPLE_PAGES = 256  # PE_PARENT pages compared byte for byte between CRIU's dump and the chain
# Candidates for the sample, drawn from the chain and read before the freeze; the final harvest and CRIU's dump
# leave those still PE_PARENT (about all of them at a few % dirty). Too few left: more are read in the window.
SAMPLE_CANDIDATES = 2 * SAMPLE_PAGES
GATHERERS = min(2, os.cpu_count() or 1)  # threads reading CRIU's kept pages
COPY_SLOTS = 3  # buffers of at most pages.BATCH_BYTES: CRIU's kept pages gathered into one while another is written


class HookSkipped(WpdumpError):
    """The hook leaves CRIU's images as they are (the reason is the message)."""


@dataclass
class HookResult:
    """What the hook did to one pid's images."""

    pid: int
    parent: str
    pages_criu: int = 0
    pages_present: int = 0
    pages_parent: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    replaced: str = ""  # CRIU's pages file, no longer referred to once the directory is synced
    old_pagemap: str = ""  # CRIU's pagemap, moved aside (_aside_path) by the commit
    spans: dict[str, float] = field(default_factory=dict)  # seconds by step (see rewrite)

    def span(self, name: str, since: float) -> float:
        """Record the time since ``since`` as step ``name``; returns now."""
        now = time.perf_counter()
        self.spans[name] = self.spans.get(name, 0.0) + now - since
        return now


@dataclass
class Prepared:
    """What the rewrite of one process can have before CRIU freezes the tree: its chain, and a random sample of
    the chain's pages (addresses ascending, one row of content each) read from the chain's pages files."""

    chain: list[Iteration]
    sample_addrs: np.ndarray
    sample_pages: np.ndarray


def prepare(chain: list[Iteration], seed: int) -> Prepared:
    """Draw SAMPLE_CANDIDATES pages of the chain's top at random and read them (before the freeze)."""
    top = chain[0].ranges()
    total = ranges.total(top) // PAGE
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(total, min(SAMPLE_CANDIDATES, total), replace=False))
    addrs = _nth_pages(top, pick)
    return Prepared(chain, addrs, read_pages(chain, addrs))


def _nth_pages(r: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Address of the ``idx``-th pages (ascending) counted across the ranges ``r``, without listing every page."""
    if not len(idx):
        return np.zeros(0, dtype=np.uint64)
    counts = ((r[:, 1] - r[:, 0]) // PAGE).astype(np.int64)
    ends = np.cumsum(counts)
    j = np.searchsorted(ends, idx, side="right")
    before = (ends - counts)[j]
    return r[j, 0] + (np.asarray(idx, dtype=np.int64) - before).astype(np.uint64) * np.uint64(PAGE)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rewrite(
    images_dir: str, pid: int, top_dir: str, tracker: Tracker, chain: list | None = None, new_id: int | None = None,
    finish: bool = True, prep: Prepared | None = None, bufs: list[np.ndarray] | None = None,
    unsynced: list[tuple[int, str]] | None = None,
) -> HookResult:
    """Turn CRIU's final images of process ``pid`` (its vpid, as CRIU names it) in ``images_dir`` into an
    increment on the chain at ``top_dir``, which the ``parent`` link of ``images_dir`` must lead to.

    ``tracker`` must have tracked the process since that iteration; the tree must be frozen. The kept pages go
    to ``pages-NEW_ID.img`` (default: one past the highest there). Without ``finish`` the caller fsyncs the
    directory and then removes CRIU's pages file (``HookResult.replaced``), once for many processes. ``prep``
    (the chain and a sample of it read before the freeze) and ``bufs`` (page-aligned buffers for the copy,
    faulted in) save that work inside CRIU's frozen window. With ``unsynced``, the new files are not fsynced here:
    their (fd, path) are appended, the fds left open for the caller to fsync and close.
    """
    t0 = t = time.perf_counter()
    name = images.pagemap_file_name(pid)
    try:
        pages_id, entries = images.decode_pagemap(read_image_file(images_dir, name), os.path.join(images_dir, name))
    except (images.ImageError, ChainError) as e:
        raise HookSkipped(f"cannot read CRIU's {name}: {e}", pid=pid, errno=errno.EINVAL) from None
    if ((entries["flags"] & images.PE_PARENT) != 0).any():
        raise HookSkipped("CRIU's dump already refers to a parent", pid=pid, errno=errno.EEXIST)
    chain = prep.chain if prep is not None else (chain or load_chain(top_dir, pid))
    top = chain[0]
    pages_path = os.path.join(images_dir, images.pages_file_name(pages_id))
    criu = images.ranges_of(entries)
    if os.path.getsize(pages_path) != ranges.total(criu):
        raise HookSkipped(f"{pages_path} does not match CRIU's pagemap", pid=pid, errno=errno.EINVAL)
    res = HookResult(pid, top.path)
    t = res.span("read", t)

    h = tracker.harvest()  # everything written since the chain's top (the tree is frozen by CRIU)
    t = res.span("harvest", t)
    unchanged = h.unchanged(top.ranges())
    parent = ranges.intersect(criu, unchanged)
    present = ranges.subtract(criu, parent)
    res.pages_criu, res.pages_present = ranges.total(criu) // PAGE, ranges.total(present) // PAGE
    res.pages_parent, res.bytes_before, res.bytes_after = ranges.total(parent) // PAGE, ranges.total(criu), \
        ranges.total(present)
    t = res.span("sets", t)

    src = os.open(pages_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    opened: list[tuple[int, str]] = []  # the new pages file and pagemap: fsynced, then closed
    committed = False
    reader = _LazyReader(tracker.pid)  # the frozen process: what CRIU's page cache no longer holds
    try:
        _check_sample(src, entries, chain, parent, pid, prep, reader, bufs[0] if bufs else None)
        t = res.span("sample", t)
        if new_id is None:
            new_id = max(_pages_ids(images_dir)) + 1
        new_pages = os.path.join(images_dir, images.pages_file_name(new_id))
        tmp_map = os.path.join(images_dir, f".{name}.wpdump-tmp")
        opened.append((os.open(new_pages, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                               0o600), new_pages))
        gather_s, from_memory = _copy_kept(src, opened[0][0], entries, present, bufs, new_pages, reader)
        res.spans["gather"] = gather_s
        if from_memory:
            res.notes.append(f"{from_memory / 2**20:.1f} MiB not in the page cache any more, read from memory")
        t = res.span("write", t + gather_s)  # what the writes added to the gathers
        opened.append((os.open(tmp_map, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                               0o600), os.path.join(images_dir, name)))
        imgdir.write_all(opened[1][0], images.encode_pagemap(new_id, images.entries_from_ranges(present, parent)),
                         tmp_map)
        t = res.span("pagemap", t)
        if unsynced is None:
            imgdir._fsync_all(opened)  # at once: the fsyncs overlap
            t = res.span("fsync", t)
        if os.path.realpath(os.path.join(images_dir, "parent")) != os.path.realpath(top.path):
            raise HookSkipped(f"{images_dir}/parent does not lead to {top.path}", pid=pid, errno=errno.EINVAL)
        # CRIU's pagemap goes aside first: renamed onto an existing name, ext4 would write the new file out
        # first (auto_da_alloc), queued behind CRIU's own writeback (10-36 ms seen at 4-8 GiB)
        final_map = os.path.join(images_dir, name)
        res.old_pagemap = _aside_path(final_map)
        os.rename(final_map, res.old_pagemap)
        try:
            os.rename(tmp_map, final_map)  # the commit point
        except BaseException:
            os.rename(res.old_pagemap, final_map)
            raise
        committed = True
    finally:
        os.close(src)
        reader.close()
        if committed and unsynced is not None:
            unsynced.extend(opened)
        else:
            for fd, _ in opened:
                os.close(fd)
        if not committed:  # CRIU's own pagemap and pages are still in place
            for p in (tmp_map, new_pages) if opened else ():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
    res.replaced = pages_path
    if finish:
        _fsync_dir(images_dir)
        _remove_detached([pages_path], [res.old_pagemap])
    t = res.span("commit", t)
    res.seconds = t - t0
    return res


def _copy_kept(src: int, dst: int, entries: np.ndarray, present: np.ndarray, bufs: list[np.ndarray] | None,
               what: str, reader: _LazyReader) -> tuple[float, int]:
    """Append the pages ``present`` (ranges) of CRIU's pages file ``src`` to ``dst``: gathered into a buffer (_gather)
    while the previous buffer is written with O_DIRECT by a thread (pages._Writer). O_DIRECT spares allocating page
    cache for ``dst``, which costs more than the disk in this VM (docs/kernel.md rule 21). Returns the seconds spent
    gathering and the bytes read from the process's memory (``reader``) instead of ``src``."""
    total = ranges.total(present)
    if not total:
        return 0.0, 0
    limit = pagecopy._batch_size(total)
    batches = ranges.batches(present, limit)
    if bufs is None or len(bufs[0]) < limit:
        bufs = copy_buffers(min(COPY_SLOTS, len(batches)), limit)
    slots = [b[:limit] for b in bufs[:max(1, min(len(bufs), len(batches)))]]
    writer = pagecopy._Writer(dst, what, threaded=len(batches) > 1)
    gather_s, from_memory = 0.0, 0
    try:
        free, queued = list(range(len(slots))), 0
        for batch in batches:
            if free:
                slot = free.pop()
            else:
                slot, queued = writer.wait(), queued - 1
            t0 = time.perf_counter()
            offs = images.page_offsets(entries, batch[:, 0]).astype(np.uint64)
            runs = np.column_stack((offs, offs + (batch[:, 1] - batch[:, 0])))
            n, mem = _gather(src, runs, batch, reader, slots[slot], what)
            gather_s += time.perf_counter() - t0
            from_memory += mem
            if len(batches) == 1:
                writer.write_now([memoryview(slots[slot])[:n]])
                break
            done: Future = Future()
            done.set_result(([memoryview(slots[slot])[:n]],))
            writer.todo.put((slot, done))
            queued += 1
        for _ in range(queued):
            writer.wait()
    finally:
        writer.close()
    return gather_s, from_memory


def _gather(src: int, runs: np.ndarray, addrs: np.ndarray, reader: _LazyReader, buf: np.ndarray, what: str
            ) -> tuple[int, int]:
    """Read the byte ranges ``runs`` of CRIU's pages file ``src`` (the pages of the address ranges ``addrs``) back to
    back into ``buf``, by GATHERERS threads, each half (_gather_part); returns (bytes, bytes read from memory)."""
    want = ranges.total(runs)
    lens = (runs[:, 1] - runs[:, 0]).astype(np.int64)
    cut = int(np.searchsorted(np.cumsum(lens), want // 2))  # about half the bytes each
    at = int(lens[:cut].sum())
    parts = [(runs[:cut], addrs[:cut], buf), (runs[cut:], addrs[cut:], buf[at:])] \
        if GATHERERS > 1 and cut >= 64 else [(runs, addrs, buf)]
    pool = _gather_pool() if len(parts) > 1 else None
    futs = [pool.submit(_gather_part, src, *p, reader, what) for p in parts[1:]] if pool else []
    try:
        mem = _gather_part(src, *parts[0], reader, what)
    finally:
        for f in futs:
            f.exception()  # every thread done with ``buf`` before it is reused
    return want, mem + sum(f.result() for f in futs)


def _gather_part(src: int, runs: np.ndarray, addrs: np.ndarray, buf: np.ndarray, reader: _LazyReader, what: str
                 ) -> int:
    """Fill ``buf`` with the ranges ``runs`` of ``src`` as far as the page cache holds them (CRIU just wrote it, but
    a dump of several GiB is partly evicted by then: one disk read per page would cost ~17 us), the rest from the
    process's memory, frozen as CRIU dumped it (memory.Reader: nothing un-shared); returns the bytes from memory."""
    got = uffd.pread_cached(src, runs, buf, what=f"read CRIU's pages for {what}")
    if got == ranges.total(runs):
        return 0
    ends = np.cumsum((runs[:, 1] - runs[:, 0]).astype(np.int64))
    j = int(np.searchsorted(ends, got, side="right"))  # the first range not read whole
    at = int(ends[j - 1]) if j else 0
    if reader.get().read_into(addrs[j:], buf[at:]) is not None:
        raise HookSkipped(f"pages of the frozen process vanished while copying {what}", errno=errno.EIO)
    return int(ends[-1]) - at


class _LazyReader:
    """A memory.Reader of process ``pid``, opened when first needed (by any gathering thread)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.reader, self.lock = pid, None, threading.Lock()

    def get(self) -> Reader:
        with self.lock:
            if self.reader is None:
                self.reader = Reader(self.pid)
            return self.reader

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()


_pool: ThreadPoolExecutor | None = None


def _gather_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(GATHERERS - 1, thread_name_prefix="wpdump-gather")
    return _pool


def copy_buffers(n: int = COPY_SLOTS, size: int = pagecopy.BATCH_BYTES) -> list[np.ndarray]:
    """``n`` page-aligned buffers of ``size`` bytes for _copy_kept, faulted in (fresh memory is slow to touch in
    this VM: better before the freeze)."""
    arena = pagecopy.aligned_buffer(n * size)
    arena[::PAGE] = 0
    return [arena[i * size : (i + 1) * size] for i in range(n)]


def _settle(unsynced: list[tuple[int, str]], images_dir: str, trash: list[str]) -> None:
    """After CRIU's frozen window: the new files and the directory made durable, then CRIU's replaced pages files
    (moved aside in the window) removed. CRIU itself never fsyncs its images (criu 4.1.1 calls no fsync, fdatasync
    or syncfs): a dump is not durable when ``criu dump`` returns, with or without the hook."""
    try:
        imgdir._fsync_all(unsynced)
    finally:
        for fd, _ in unsynced:
            os.close(fd)
    _fsync_dir(images_dir)
    for p in trash:
        with contextlib.suppress(OSError):
            os.unlink(p)


def _aside_path(path: str) -> str:
    """The hidden name a file to be removed gets (no image reader lists it)."""
    return os.path.join(os.path.dirname(path), f".wpdump-unlink-{os.path.basename(path)}".removesuffix(".img"))


def move_aside(paths: list[str]) -> list[str]:
    """Rename files to be removed to hidden names (_aside_path); returns the new paths."""
    trash = []
    for path in paths:
        t = _aside_path(path)
        os.rename(path, t)
        trash.append(t)
    return trash


def _remove_detached(paths: list[str], aside: Sequence[str] = ()) -> None:
    """Remove CRIU's pages files after its frozen window: each renamed aside now (microseconds), then unlinked (with
    the files already ``aside``) by one process of its own that outlives the hook (CRIU waits for the hook alone).
    Unlinking them inside the window cost 1.3 s for 8 GiB here (ext4 frees every block), 50 ms for 1 GiB."""
    trash = move_aside(paths) + list(aside)
    if not trash:
        return
    try:
        subprocess.Popen(["rm", "-f", "--", *trash], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError:
        for t in trash:
            os.unlink(t)


def _pages_ids(images_dir: str) -> list[int]:
    return [int(m.group(1)) for n in os.listdir(images_dir) if (m := re.fullmatch(r"pages-(\d+)\.img", n))]


def _check_sample(src: int, entries: np.ndarray, chain: list, parent: np.ndarray, pid: int,
                  prep: Prepared | None, reader: _LazyReader, buf: np.ndarray | None = None) -> None:
    """Compare a random sample of the would-be PE_PARENT pages between CRIU's dump and the chain: the candidates
    ``prep`` read from the chain before the freeze that are still PE_PARENT, topped up from ``parent`` (read from
    the chain now) when fewer than SAMPLE_PAGES (or all of ``parent``) are left. CRIU's pages are read into
    ``buf`` when it is large enough (faulted in before the freeze); those the page cache no longer holds from the
    frozen process (``reader``), as _gather_part does."""
    if not len(parent):
        return
    want_n = min(SAMPLE_PAGES, ranges.total(parent) // PAGE)
    addrs, want = np.zeros(0, dtype=np.uint64), np.zeros((0, PAGE), dtype=np.uint8)
    if prep is not None and len(prep.sample_addrs):
        keep = np.flatnonzero(in_ranges(prep.sample_addrs, parent))[:want_n]
        addrs, want = prep.sample_addrs[keep], prep.sample_pages[keep]
    if len(addrs) < want_n:  # top up: pages of ``parent`` not drawn yet, read from the chain in the window
        rest = ranges.subtract(parent, ranges.from_pages(addrs)) if len(addrs) else parent
        total = ranges.total(rest) // PAGE
        rng = np.random.default_rng([pid, time.time_ns()])
        more = _nth_pages(rest, np.sort(rng.choice(total, min(want_n - len(addrs), total), replace=False)))
        order = np.argsort(np.concatenate((addrs, more)), kind="stable")
        addrs = np.concatenate((addrs, more))[order]
        want = np.concatenate((want, read_pages(chain, more)))[order]
    offs = images.page_offsets(entries, addrs).astype(np.uint64)
    n = len(addrs) * PAGE
    got = (buf[:n] if buf is not None and len(buf) >= n else np.empty(n, dtype=np.uint8)).reshape(-1, PAGE)
    if (offs + np.uint64(PAGE) > np.uint64(os.fstat(src).st_size)).any():
        raise HookSkipped("CRIU's pages file is shorter than its pagemap says", pid=pid, errno=errno.EINVAL)
    one = np.uint64(PAGE)
    _gather_part(src, np.column_stack((offs, offs + one)), np.column_stack((addrs, addrs + one)), got.reshape(-1),
                 reader, "the sample")
    bad = np.flatnonzero((got.view(np.uint64) != np.ascontiguousarray(want).view(np.uint64)).any(axis=1))
    if len(bad):
        raise HookSkipped(f"the chain's page {int(addrs[bad[0]]):#x} differs from CRIU's dump: not vouching for it",
                          pid=pid, errno=errno.EINVAL)


def run_hook(env: dict[str, str] | None = None, out=sys.stderr, standby: bool = False) -> int:
    """The action-script entry point: acts on ``pre-dump`` and ``post-dump``; always returns 0 (CRIU's
    dump must complete: at worst it stays a full dump). With ``standby``, the pre-dump action leaves a process
    ready (everything imported, the chains loaded) to do the post-dump work when asked (hook_entry.py)."""
    env = dict(os.environ if env is None else env)
    action = env.get("CRTOOLS_SCRIPT_ACTION")
    if action not in ("pre-dump", "post-dump"):
        return 0
    try:
        images_dir = os.path.realpath(env["CRTOOLS_IMAGE_DIR"])
        root = int(env["CRTOOLS_INIT_PID"])
    except (KeyError, ValueError):
        print("wpdump criu-hook: no CRTOOLS_IMAGE_DIR / CRTOOLS_INIT_PID: not run by criu dump?", file=out)
        return 0
    if action == "pre-dump":
        rc = _pre_dump(root, out)
        if standby:
            from .hook_standby import start

            start(images_dir, root, out)
        return rc
    post_dump(images_dir, root, out)
    return 0


def post_dump(images_dir: str, root: int, out, ready: Ready | HookSkipped | None = None,
              after: contextlib.ExitStack | None = None) -> None:
    """The post-dump work: every process's pagemap rewritten (or left as CRIU wrote it), one line each
    (``ready``, ``after``: see hook_tree; a HookSkipped: why get_ready could not prepare the tree)."""
    try:
        if isinstance(ready, HookSkipped):
            raise ready
        results, skipped = hook_tree(images_dir, root, ready, after)
    except (WpdumpError, OSError) as e:
        print(f"wpdump criu-hook: pid {root}: left CRIU's full images as they are: {e}", file=out, flush=True)
        return
    for vpid, why in skipped:
        print(f"wpdump criu-hook: process {vpid}: left CRIU's full images as they are: {why}", file=out, flush=True)
    for res in results:
        steps = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in res.spans.items())
        print(
            f"wpdump criu-hook: process {res.pid}: {res.pages_parent} of {res.pages_criu} pages now in the parent "
            f"{res.parent}, {res.pages_present} kept ({res.bytes_after / 2**20:.1f} of "
            f"{res.bytes_before / 2**20:.1f} MiB) in {res.seconds * 1e3:.1f} ms ({steps} ms)"
            + "".join(f"; {n}" for n in res.notes), file=out, flush=True,
        )


def _pre_dump(pid: int, out) -> int:
    """Before CRIU freezes and reads the tree: no write-protect marker may remain on an empty page."""
    t0 = time.perf_counter()
    try:
        n = unmark(pid)
    except (WpdumpError, OSError) as e:
        # Past the checkout the keeper sees it end without a checkin and ends tracking: closing the
        # userfaultfds drops every marker (docs/kernel.md rule 10); post-dump then keeps CRIU's full images.
        print(f"wpdump criu-hook: pid {pid}: markers not removed (CRIU reads them as swapped pages): {e}",
              file=out, flush=True)
        return 0
    if n is not None:
        print(f"wpdump criu-hook: pid {pid}: removed write-protect markers from {n / 2**20:.1f} MiB of empty pages "
              f"in {(time.perf_counter() - t0) * 1e3:.1f} ms", file=out, flush=True)
    return 0


def unmark(pid: int) -> int | None:
    """Remove the trackers' markers from the empty pages of every process of the tree rooted at ``pid`` (bytes),
    tracking going on; None if ``pid`` is not tracked. On an error nothing is given back: tracking ends."""
    ks = KeeperSession.connect(pid)
    if ks is None:
        return None
    with ks:
        trackers = ks.take()
        n = sum(tr.unmark_empty() for tr in trackers.values())
        ks.giveback()  # the dirty sets are unconsumed: the states are unchanged
        return n


@dataclass
class Ready:
    """What the post-dump work of a tree can have before CRIU freezes it (get_ready): the keeper session with the
    trackers checked out, the iteration tracked since, each process's chain and sample, the copy buffers."""

    ks: KeeperSession
    top_dir: str
    by_process: dict[tuple[int, int], int]  # (pid, start ticks) -> vpid in the iteration
    trackers: dict[str, Tracker]
    prepared: dict[int, Prepared]  # by vpid
    failed: dict[int, str]  # vpid -> why its chain cannot be used
    bufs: list[np.ndarray] | None = None


def get_ready(root: int, ks: KeeperSession, sample: bool = True, bufs: list[np.ndarray] | None = None) -> Ready:
    """Check the tree's last wpdump iteration, check its trackers out of ``ks`` and load every process's chain
    (``sample``: and read a sample of it, prepare); raises HookSkipped when the tree cannot be rewritten."""
    st = check_alive(root)
    status = ks.status()
    top_dir = status.get("images_dir") or ""
    if not top_dir or not os.path.isdir(top_dir):
        raise HookSkipped(f"the last wpdump iteration {top_dir!r} is gone", pid=root, errno=errno.ENOENT)
    meta = read_meta(top_dir) or {}
    if meta.get("iteration") != status.get("iteration"):
        raise HookSkipped(f"{top_dir} is not the iteration tracked since", pid=root, errno=errno.ESTALE)
    root_meta = member_meta(meta, meta.get("vpid", root)) or {}
    if not same_process(root_meta, st.start_ticks):
        raise HookSkipped(f"{top_dir} is an image of another process", pid=root, errno=errno.ESRCH)
    by_process = {(int(p["pid"]), int(p["start_ticks"])): int(v) for v, p in meta.get("processes", {}).items()}
    if "processes" not in meta:  # an iteration of one process (format 1)
        by_process = {(root, st.start_ticks): int(meta.get("pid", root))}
    trackers = ks.take()
    ready = Ready(ks, top_dir, by_process, trackers, {}, {}, bufs)
    seed = time.time_ns()
    for tr in trackers.values():
        vpid = by_process.get((tr.pid, tr.start_ticks))
        if vpid is None:
            continue
        try:
            chain = load_chain(top_dir, vpid)
            ready.prepared[vpid] = prepare(chain, seed ^ vpid) if sample else \
                Prepared(chain, np.zeros(0, dtype=np.uint64), np.zeros((0, PAGE), dtype=np.uint8))
        except ChainError as e:
            ready.failed[vpid] = str(e)
    return ready


def hook_tree(
    images_dir: str, root: int, ready: Ready | None = None, after: contextlib.ExitStack | None = None,
) -> tuple[list[HookResult], list[tuple[int, str]]]:
    """Rewrite CRIU's pagemap of every process of the tree rooted at ``root`` that wpdump tracked since its last
    iteration; returns the results and the (vpid, why) of the processes left as CRIU wrote them. ``ready``:
    get_ready's, before the freeze (else done now). ``after``: what can wait until CRIU's frozen window is over is
    left to it (ending tracking and closing the trackers, when the last close of a userfaultfd drops the
    write-protection of a whole tree; removing CRIU's replaced pages files)."""
    own = contextlib.ExitStack()
    if ready is None:
        check_alive(root)
        ks = KeeperSession.connect(root)
        if ks is None:
            raise HookSkipped(f"pid {root} is not tracked by wpdump (no keeper)", pid=root, errno=errno.ENOENT)
        (own if after is None else after).enter_context(ks)
        try:
            ready = get_ready(root, ks, sample=False)
        except BaseException:
            own.close()
            raise
    else:
        (own if after is None else after).enter_context(ready.ks)
    results: list[HookResult] = []
    skipped: list[tuple[int, str]] = []
    unsynced: list[tuple[int, str]] | None = None if after is None else []
    with own:
        link = os.path.join(images_dir, "parent")
        if os.path.lexists(link):
            raise HookSkipped(f"{images_dir} already has a parent link", pid=root, errno=errno.EEXIST)
        criu_vpids = set(_pagemap_vpids(images_dir))
        next_id = max(_pages_ids(images_dir), default=0) + 1
        os.symlink(os.path.relpath(ready.top_dir, images_dir), link)  # before any PE_PARENT entry can appear
        try:
            for tr in ready.trackers.values():
                vpid = ready.by_process.get((tr.pid, tr.start_ticks))
                if vpid is None:
                    continue  # a process that appeared after the last iteration: CRIU's full pages stay
                if vpid not in criu_vpids:
                    skipped.append((vpid, f"CRIU's dump holds no {images.pagemap_file_name(vpid)}"))
                    continue
                criu_vpids.discard(vpid)
                if vpid in ready.failed:
                    skipped.append((vpid, ready.failed[vpid]))
                    continue
                try:
                    results.append(rewrite(images_dir, vpid, ready.top_dir, tr, new_id=next_id, finish=False,
                                           prep=ready.prepared[vpid], bufs=ready.bufs, unsynced=unsynced))
                    next_id += 1
                except (HookSkipped, ChainError) as e:
                    skipped.append((vpid, str(e)))
        finally:
            if not results:
                os.unlink(link)
            if unsynced is None:
                _fsync_dir(images_dir)  # every new pagemap (and the link) durable before CRIU's pages files go
                _remove_detached([r.replaced for r in results], [r.old_pagemap for r in results])
            else:
                after.callback(_settle, unsynced, images_dir,
                               move_aside([r.replaced for r in results]) + [r.old_pagemap for r in results])
        skipped.extend((v, "not tracked by wpdump since its last iteration") for v in sorted(criu_vpids))
        # the final dump: tracking ends (the harvests above consumed the dirty sets). Not waited for: dropping the
        # write-protection of a big tree takes the keeper tens of ms a GiB, which CRIU's frozen window need not hold
        if after is None:
            ready.ks.untrack(wait=False)
        else:
            after.callback(ready.ks.untrack, quiet=True, wait=False)
    return results, skipped


def _pagemap_vpids(images_dir: str) -> list[int]:
    return [int(m.group(1)) for n in os.listdir(images_dir) if (m := re.fullmatch(r"pagemap-(\d+)\.img", n))]


def main() -> int:
    """``wpdump-criu-hook``: CRIU execs action scripts without a shell, so the hook is its own program."""
    return run_hook()
