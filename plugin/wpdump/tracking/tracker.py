"""Tracker: write-tracking of a live process with userfaultfd async write-protect + PAGEMAP_SCAN."""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import pickle
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .. import ranges
from ..errors import (
    AlreadyTracked,
    KernelUnsupported,
    NoSuchProcess,
    RangeBusy,
    TargetExeced,
    TargetExited,
    TargetUsesUserfaultfd,
    TrackerError,
    WpdumpError,
    from_errno,
)
from ..ranges import PAGE
from ..target import freeze, iouring, procfds, uffd
from ..target.freeze import open_userfaultfd
from ..target.process import check_alive, open_proc, pidfd_open, read_proc_text, read_stat, threads
from ..target.uffd import (
    PAGE_IS_FILE,
    PAGE_IS_GUARD,
    PAGE_IS_PFNZERO,
    PAGE_IS_PRESENT,
    PAGE_IS_SWAPPED,
    RegionBuffer,
)
from ..target.vmas import Policy, Vma, VmaEvent, diff_layouts, from_tuples, policy_for, read_maps, read_vmflags
from . import pinned

log = logging.getLogger("wpdump.tracker")

SEEK_DATA, SEEK_HOLE = 3, 4
_RETRIES = 8
STATE_VERSION = 1  # of export_state: a keeper started by another wpdump may hold another layout
PAUSE_WINDOW = 4e-3  # longest pause of the target's running threads for a scan (WPDUMP_PAUSE_US; 0: never)
_PIECE = 64 << 20  # anonymous VMAs are scanned in pieces this large (aligned) between pause decisions
_RATE = 0.5e12  # bytes per second of a paused scan, first guess (measured: ~1 GiB per ms at 1 % written)
_PROBE = 128 << 20  # bytes first scanned unpaused, to see whether flush interrupts slow the scan
_SLOWER = 2.0  # ... "slow": this many times a paused scan's time (+ 50 µs); 0: pause whenever a thread runs
_NICE = -10  # of the harvesting thread while it pauses the target (_raise_priority)


def pause_window() -> float:
    """The longest pause of a target's running threads around a scan, in seconds: $WPDUMP_PAUSE_US or 4 ms."""
    raw = os.environ.get("WPDUMP_PAUSE_US", "").strip()
    if not raw:
        return PAUSE_WINDOW
    try:
        return max(0, int(raw)) / 1e6
    except ValueError:
        raise TrackerError(f"WPDUMP_PAUSE_US={raw!r} is not a number of microseconds", errno=errno.EINVAL) from None


@dataclass
class VmaPages:
    """What one round found in one VMA. Ranges are n×2 uint64 arrays of [start, end).

    ``whole`` means ``copy`` lists every page with content (a new VMA, one dumped whole every round,
    or one whose dirty information was lost); pages outside it are zero (anonymous), file content
    (private file mapping) or unmapped by the target.
    """

    vma: Vma
    policy: Policy
    copy: np.ndarray
    zero: np.ndarray = field(default_factory=lambda: ranges.EMPTY)
    reverted: np.ndarray = field(default_factory=lambda: ranges.EMPTY)
    guard: np.ndarray = field(default_factory=lambda: ranges.EMPTY)
    whole: bool = False

    @property
    def copy_bytes(self) -> int:
        return ranges.total(self.copy)


@dataclass
class Harvest:
    """One round: pages per VMA, layout events since the previous round, problems met."""

    round: int
    vmas: list[VmaPages]
    events: list[VmaEvent]
    problems: list[WpdumpError]
    seconds: float
    warnings: list[str] = field(default_factory=list)  # what this round could not vouch for
    unreadable: list[Vma] = field(default_factory=list)  # VMAs nothing can read (memfd_secret)
    stalls: list[float] = field(default_factory=list)  # seconds of each pause of the target's running threads

    def copy_ranges(self) -> np.ndarray:
        """All ranges to copy, in address order."""
        parts = [v.copy for v in self.vmas if len(v.copy)]
        return np.concatenate(parts) if parts else ranges.EMPTY

    def zero_ranges(self) -> np.ndarray:
        """All ranges that became zero this round."""
        parts = [v.zero for v in self.vmas if len(v.zero)]
        return np.concatenate(parts) if parts else ranges.EMPTY

    @property
    def copy_bytes(self) -> int:
        return sum(v.copy_bytes for v in self.vmas)

    def changed(self) -> np.ndarray:
        """Every range that may differ from the previous round: VMAs reported whole, and the pages written,
        zeroed, reverted to file content or turned into guards."""
        whole = ranges.from_pairs([(v.vma.start, v.vma.end) for v in self.vmas if v.whole])
        parts = (r for v in self.vmas if not v.whole for r in (v.copy, v.zero, v.reverted, v.guard))
        return ranges.union(whole, *parts)

    def unchanged(self, parent: np.ndarray, written: np.ndarray = ranges.EMPTY) -> np.ndarray:
        """Pages of ``parent`` still valid now: in a VMA tracked (not reported whole) this round and neither
        ``written``, zeroed, reverted to file content nor turned into a guard since (two sweeps in all)."""
        tracked = ranges.from_pairs([(v.vma.start, v.vma.end) for v in self.vmas
                                     if not v.whole and v.policy is Policy.TRACK])
        changed = ranges.union(written, *(r for v in self.vmas for r in (v.copy, v.zero, v.reverted, v.guard)))
        return ranges.subtract(ranges.intersect(parent, tracked), changed)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Run a block with Python's cyclic garbage collector off. A round builds containers per VMA (tens of
    thousands) and each collection re-traverses every live object: a third of the CPU time of a 30,000-VMA
    iteration. Reference counting still frees what the block drops; the collector runs again after it."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _coalesce(r: np.ndarray) -> np.ndarray:
    """Merge touching ranges of sorted, disjoint ``r`` (PAGEMAP_SCAN reports regions in address order):
    one pass, no sort (ranges.merge sorts: half of classify's time at 20k regions)."""
    if len(r) <= 1:
        return r
    if (r[1:, 0] < r[:-1, 1]).any():  # not sorted and disjoint after all
        return ranges.merge(r)
    brk = np.flatnonzero(r[1:, 0] != r[:-1, 1]) + 1
    out = np.empty((len(brk) + 1, 2), dtype=np.uint64)
    out[:, 0] = r[np.concatenate(([0], brk)), 0]
    out[:, 1] = r[np.concatenate((brk - 1, [len(r) - 1])), 1]
    return out


def _kinds(regions: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per PAGEMAP_SCAN region: (categories, n×2 ranges, guard, has data, zero page, to copy, gone)."""
    cat = regions["categories"]
    rng = np.column_stack((regions["start"], regions["end"])).astype(np.uint64)
    guard = (cat & PAGE_IS_GUARD) != 0
    has_data = ((cat & (PAGE_IS_PRESENT | PAGE_IS_SWAPPED)) != 0) & ~guard
    zeropage = has_data & ((cat & PAGE_IS_PFNZERO) != 0)
    copy = has_data & ~zeropage
    gone = ~has_data & ~guard
    return cat, rng, guard, has_data, zeropage, copy, gone


def classify(vma: Vma, regions: np.ndarray, policy: Policy, whole: bool) -> VmaPages:
    """Turn PAGEMAP_SCAN regions (reported WRITTEN) into copy / zero / reverted / guard ranges.

    docs/kernel.md "Classifying a page reported WRITTEN": a written page that is neither present nor
    swapped was zapped: zero in anonymous memory, file content again in a private file mapping.
    """
    cat, rng, guard, has_data, zeropage, copy, gone = _kinds(regions)
    file_backed = ((cat & PAGE_IS_FILE) != 0) | (vma.inode != 0)  # an array, never a bare bool
    if vma.anonymous:
        zero, reverted = gone | zeropage, np.zeros_like(gone)
    elif vma.shared:
        zero, reverted = zeropage, np.zeros_like(gone)
        copy = copy | gone  # content lives in the shared object: read it
    else:
        # a present page cache page is the file's own content (never COWed): the file supplies it
        file_page = has_data & ((cat & PAGE_IS_FILE) != 0) & ((cat & PAGE_IS_PRESENT) != 0)
        copy = copy & ~file_page
        zero = zeropage | (gone & ~file_backed)
        reverted = (gone & file_backed) | (file_page & ~zeropage)
    return VmaPages(
        vma, policy, _coalesce(rng[copy]), _coalesce(rng[zero]), _coalesce(rng[reverted]), _coalesce(rng[guard]),
        whole,
    )


def _raise_priority() -> int:
    """Nice _NICE for this thread while it pauses the target: neither the target's threads it wakes at each detach
    nor other processes take its CPU mid-scan (2 CPUs here: a running 8 GiB harvest waited 8 ms of 24 for one,
    17 ms in all at nice -10). Returns the nice to restore; unchanged where not permitted (no CAP_SYS_NICE)."""
    old = os.getpriority(os.PRIO_PROCESS, 0)  # PRIO_PROCESS 0: the calling thread (nice is per thread)
    if old > _NICE:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, _NICE)
    return old


def _restore_priority(nice: int) -> None:
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, nice)


def _pieces(spans: np.ndarray, split: np.ndarray, piece: int) -> tuple[np.ndarray, np.ndarray]:
    """``spans`` (n×2) with those marked in ``split`` cut at multiples of ``piece`` bytes: (pieces, the span
    of each piece)."""
    lo, hi = spans[:, 0], spans[:, 1]
    p = np.uint64(piece)
    blocks = np.where(split, (hi - np.uint64(1)) // p - lo // p + np.uint64(1), 1).astype(np.int64)
    owner = np.repeat(np.arange(len(spans)), blocks)
    k = np.arange(len(owner)) - np.repeat(np.cumsum(blocks) - blocks, blocks)  # index within its span
    first = lo[owner] // p + k.astype(np.uint64)  # each piece's piece-sized block
    start = np.maximum(lo[owner], first * p)
    end = np.where(split[owner], np.minimum(hi[owner], (first + np.uint64(1)) * p), hi[owner])
    return np.column_stack((start, end)).astype(np.uint64), owner


def _join_pieces(
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], owner: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The results of uffd.scan_ranges over pieces (``owner``: each piece's span) as one over the ``n`` spans:
    a span fails with the worst errno of its pieces and then contributes no regions (rule 4)."""
    regions = np.concatenate([r for r, _, _ in parts])
    counts = np.concatenate([c for _, c, _ in parts])
    perrs = np.concatenate([e for _, _, e in parts])
    errs = np.zeros(n, dtype=np.int32)
    np.maximum.at(errs, owner, perrs)  # EPERM (1) is the mildest: any other errno is raised
    keep = errs[np.repeat(owner, counts)] == 0
    total = np.bincount(owner, weights=counts, minlength=n).astype(np.int64)
    total[errs != 0] = 0
    return regions[keep], total, errs


def _split_by_vma(r: np.ndarray, vi: np.ndarray, n: int) -> tuple[np.ndarray, list[int]]:
    """_coalesce of the rows of several VMAs at once (``vi``: each row's VMA index, rows in address order),
    never across VMAs: the merged rows and, per VMA i, its rows' bounds [b[i], b[i + 1])."""
    if len(r) > 1:
        brk = np.flatnonzero((r[1:, 0] != r[:-1, 1]) | (vi[1:] != vi[:-1])) + 1
        first, last = np.concatenate(([0], brk)), np.concatenate((brk - 1, [len(r) - 1]))
        r = np.column_stack((r[first, 0], r[last, 1]))
        vi = vi[first]
    return r, np.searchsorted(vi, np.arange(n + 1)).tolist()


def classify_many(
    vmas: list[Vma], regions: np.ndarray, counts: np.ndarray, policy: Policy, whole: bool = False
) -> list[VmaPages]:
    """:func:`classify` of many VMAs at once (vectorised over all regions): the regions of ``vmas[i]`` (in
    address order) are the next ``counts[i]`` rows of ``regions``."""
    n = len(vmas)
    counts = np.asarray(counts, dtype=np.int64)
    if len(regions) and not (regions["start"][1:] >= regions["end"][:-1]).all():
        # not sorted and disjoint after all: one VMA at a time (classify merges)
        ends = np.cumsum(counts).tolist()
        return [classify(v, regions[e - c : e], policy, whole)
                for v, c, e in zip(vmas, counts.tolist(), ends, strict=True)]
    has = np.flatnonzero(counts)
    kinds = np.array([0 if vmas[i].anonymous else 1 if vmas[i].shared else 2 for i in has.tolist()], dtype=np.int8)
    inode = np.array([vmas[i].inode != 0 for i in has.tolist()], dtype=bool)
    reps = counts[has]
    kind, has_inode, vi = np.repeat(kinds, reps), np.repeat(inode, reps), np.repeat(has, reps)
    cat, rng, guard, has_data, zeropage, copy, gone = _kinds(regions)
    is_file = (cat & PAGE_IS_FILE) != 0
    file_backed = is_file | has_inode
    file_page = has_data & is_file & ((cat & PAGE_IS_PRESENT) != 0)
    anon, shared, private = kind == 0, kind == 1, kind == 2
    # the three cases of classify, region by region
    copy = np.where(shared, copy | gone, np.where(private, copy & ~file_page, copy))
    zero = np.where(anon, gone | zeropage, np.where(shared, zeropage, zeropage | (gone & ~file_backed)))
    reverted = private & ((gone & file_backed) | (file_page & ~zeropage))
    parts = [_split_by_vma(rng[m], vi[m], n) for m in (copy, zero, reverted, guard)]
    (c, cb), (z, zb), (rv, rb), (g, gb) = parts
    empty = ranges.EMPTY
    out = []
    for i, v in enumerate(vmas):
        out.append(VmaPages(
            v, policy,
            c[cb[i] : cb[i + 1]] if cb[i] != cb[i + 1] else empty,
            z[zb[i] : zb[i + 1]] if zb[i] != zb[i + 1] else empty,
            rv[rb[i] : rb[i + 1]] if rb[i] != rb[i + 1] else empty,
            g[gb[i] : gb[i + 1]] if gb[i] != gb[i + 1] else empty,
            whole,
        ))
    return out


class Tracker:
    """Attach to ``pid`` and track its writes; ``initial`` holds the attach-time (whole) contents.

    Each ``harvest()`` reports the pages written since the previous one and re-protects them
    atomically. ``close()`` (or the tracker dying) leaves the target unprotected and running.
    """

    def __init__(
        self, pid: int, *, region_capacity: int = 1 << 16, watch_io_uring: bool = True,
        allow_userfaultfd_target: bool = False, pause: float | None = None,
    ) -> None:
        self.pid = pid
        self.round = 0
        self.pause = pause_window() if pause is None else pause  # seconds; 0: never pause (_scan_tracked)
        self._rate = _RATE
        self._stalls: list[float] = []
        self.watch_io_uring = watch_io_uring
        self._buf = RegionBuffer(region_capacity)
        self._policy: dict[tuple, tuple[Policy, str]] = {}
        self._busy: dict[tuple[int, int], RangeBusy] = {}
        self._layout: list[Vma] = []
        self._cow: dict[tuple[int, int], np.ndarray] = {}  # private file VMAs: their COWed pages
        self._inflight = ranges.EMPTY  # buffers of reads in flight at the last round (pinned.py)
        self._uffd = -1
        self._pidfd = -1
        self.start_ticks = check_alive(pid).start_ticks
        self._check_other_userfaultfds(allow_userfaultfd_target)
        self._pidfd = pidfd_open(pid)
        try:
            missing = uffd.missing_features()
            if missing:
                raise KernelUnsupported(missing[0], pid=pid)
            self._uffd = open_userfaultfd(pid, self._pidfd)
            uffd.api(self._uffd, pid)
            with gc_paused():
                self.initial = self._harvest(initial=True)
        except BaseException:
            self.close()
            raise

    @classmethod
    def adopt(cls, pid: int, uffd_fd: int, state: bytes) -> Tracker:
        """Resume tracking with a userfaultfd and the state another process exported (keeper hand-over).

        Takes ownership of ``uffd_fd``. Raises TargetExited if ``pid`` is no longer the tracked process.
        """
        self = cls.__new__(cls)
        self._uffd, self._pidfd = uffd_fd, -1
        self.pause, self._rate, self._stalls = pause_window(), _RATE, []
        try:
            st = pickle.loads(state)
            if not isinstance(st, dict) or st.get("version") != STATE_VERSION:
                got = st.get("version") if isinstance(st, dict) else None
                raise TrackerError(
                    f"tracker state of pid {pid} has version {got}, this wpdump reads {STATE_VERSION} (a keeper "
                    "of another wpdump version?): untrack and dump in full", pid=pid, errno=errno.EPROTO,
                )
            if st["pid"] != pid:
                raise TrackerError(f"tracker state is for pid {st['pid']}, not {pid}", pid=pid, errno=errno.EINVAL)
            self.pid, self.round, self.watch_io_uring = pid, st["round"], st["watch_io_uring"]
            self.start_ticks = st["start_ticks"]
            self._buf = RegionBuffer(st["region_capacity"])
            policies = {p.value: p for p in Policy}
            keys = from_tuples([k for k, _, _ in st["policy"]])
            self._policy = {k: (policies[p], why) for k, (_, p, why) in zip(keys, st["policy"], strict=True)}
            self._busy = {
                (s, e): RangeBusy(s, e, path, pid=pid, errno=errno.EBUSY) for s, e, path in st["busy"]
            }
            self._layout, self._cow, self._inflight = from_tuples(st["layout"]), st["cow"], st["inflight"]
            self._busy_allowed = st["busy_allowed"]
            self.initial = None  # type: ignore[assignment]
            if check_alive(pid).start_ticks != self.start_ticks:
                raise TargetExited(f"target {pid} exited (the pid now names another process)", pid=pid,
                                   errno=errno.ESRCH)
            self._pidfd = pidfd_open(pid)
        except BaseException:
            self.close()
            raise
        return self

    def export_state(self) -> bytes:
        """Everything but the userfaultfd that a later :meth:`adopt` needs to go on tracking."""
        return pickle.dumps({
            "version": STATE_VERSION, "pid": self.pid, "round": self.round, "watch_io_uring": self.watch_io_uring,
            "start_ticks": self.start_ticks, "region_capacity": self._buf.capacity,
            # plain tuples and strings: pickling 30,000 Vma or Policy objects takes a tenth of a second
            "policy": [(tuple(k), p.value, why) for k, (p, why) in self._policy.items()],
            "busy": [(b.start, b.end, "") for b in self._busy.values()],
            "layout": [tuple(v) for v in self._layout], "cow": self._cow, "inflight": self._inflight,
            "busy_allowed": self._busy_allowed,
        })

    # ---- public API ----

    def harvest(self) -> Harvest:
        """Pages written since the last round (re-protected atomically), zeroed ranges, VMA events."""
        if self._uffd < 0:
            raise TrackerError(f"tracker of pid {self.pid} is closed", pid=self.pid)
        self.round += 1
        try:
            with gc_paused():
                return self._harvest(initial=False)
        except NoSuchProcess as e:  # /proc files of the target vanished mid-round: it exited
            if isinstance(e, TargetExited):
                raise
            raise TargetExited(f"target {self.pid} exited", pid=self.pid, errno=errno.ESRCH) from None

    def close(self) -> None:
        """Release the userfaultfd: the kernel unregisters every range and drops all write-protection."""
        for attr in ("_uffd", "_pidfd"):
            fd = getattr(self, attr, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def uffd_fd(self) -> int:
        """The tracking userfaultfd (for handing over to a keeper process)."""
        return self._uffd

    @property
    def busy_ranges(self) -> list[RangeBusy]:
        """Ranges the target registered with its own userfaultfd (not trackable, dumped whole)."""
        return list(self._busy.values())

    # ---- one round ----

    def _harvest(self, initial: bool) -> Harvest:
        t0 = time.perf_counter()
        # Reopened each round: after execve the old fd would show an empty mm (no error).
        pagemap = self._open_pagemap()
        # reads in flight are looked for before and after the scan re-protects: a pin taken before the
        # re-protect shows as a thread blocked in its read at one of the two looks (pinned.py)
        before = self._in_flight() if self.watch_io_uring else None
        try:
            out, fresh, problems, layout = self._scan_all(pagemap)
        finally:
            os.close(pagemap)
        self._check_target(layout)
        warnings = self._add_pinned(out, before)
        events = [] if initial else diff_layouts(self._layout, layout, fresh)
        self._layout = layout
        self._prune(layout)
        out.sort(key=lambda v: v.vma.start)
        unreadable = [v for v in layout if v.secret]
        stalls, self._stalls = self._stalls, []
        return Harvest(self.round, out, events, problems, time.perf_counter() - t0, warnings, unreadable, stalls)

    def _scan_all(self, pagemap: int) -> tuple[list[VmaPages], set, list[WpdumpError], list[Vma]]:
        maps = read_maps(self.pid)
        out: list[VmaPages] = []
        fresh: set[tuple[int, int]] = set()
        problems: list[WpdumpError] = []
        lost: list[tuple[int, int]] = []
        flags = self._vmflags_for(maps)
        scan: list[Vma] = []
        for v in maps:
            pol, _ = self._policy_of(v, flags)
            if pol is Policy.SKIP:
                continue
            if pol is Policy.WHOLE or (v.start, v.end) in self._busy:
                out.append(self._whole(pagemap, v, pol))
                continue
            scan.append(v)
        # One native loop over the tracked VMAs, one call each (docs/kernel.md rule 4). PAGE_IS_FILE only
        # where classify needs it: it costs a page lookup per PTE (docs/kernel.md, costs).
        file_private = [not v.anonymous and not v.shared for v in scan]
        masks = np.where(file_private, uffd.CLASSIFY_MASK, uffd.CLASSIFY_MASK_NO_FILE).astype(np.uint64)
        spans = np.array([(v.start, v.end) for v in scan], dtype=np.uint64).reshape(-1, 2)
        regions, counts, errs = self._scan_tracked(pagemap, spans, masks, [v.anonymous for v in scan])
        failed = np.flatnonzero(errs).tolist()
        for i in failed:
            if errs[i] != errno.EPERM:
                raise self._error(from_errno(int(errs[i]), self.pid, "PAGEMAP_SCAN"))
            # Unregistered (new VMA) or changed under us. docs/kernel.md rule 4: the call may
            # already have re-protected written pages it could not return: dump it whole.
            lost.append((scan[i].start, scan[i].end))
        ok = np.ones(len(scan), dtype=bool)
        ok[failed] = False
        keep = np.flatnonzero(ok).tolist()
        pages = classify_many([scan[i] for i in keep], regions, counts[ok], Policy.TRACK)
        self._find_reverted(pagemap, [res for i, res in zip(keep, pages, strict=True) if file_private[i]])
        out.extend(pages)
        changed = False
        for _ in range(_RETRIES):
            if not lost:
                break
            maps = read_maps(self.pid)
            flags = self._vmflags_for(maps)
            spans = np.array([(v.start, v.end) for v in maps], dtype=np.uint64).reshape(-1, 2)
            todo = [maps[i] for i in np.flatnonzero(ranges.overlaps(spans, ranges.from_pairs(lost))).tolist()]
            lost = []
            # results overlapping a re-examined VMA are stale: drop them
            done = np.array([(p.vma.start, p.vma.end) for p in out], dtype=np.uint64).reshape(-1, 2)
            stale = ranges.overlaps(done, ranges.from_pairs([(v.start, v.end) for v in todo]))
            out = [p for p, bad in zip(out, stale.tolist(), strict=True) if not bad]
            track: list[Vma] = []
            for v in todo:
                pol, _ = self._policy_of(v, flags)
                if pol is Policy.SKIP:
                    continue
                if pol is Policy.WHOLE:
                    out.append(self._whole(pagemap, v, pol))
                    continue
                track.append(v)
            changed = changed or bool(track)
            tracked = []
            for v, res in zip(track, self._track_new_many(pagemap, track, fresh), strict=True):
                if res is None:
                    lost.append((v.start, v.end))
                else:
                    out.append(res)
                    tracked.append(res)
            # their COW sets from now on: a COW page zapped before the next round must show (rule 20)
            self._find_reverted(pagemap, [r for r in tracked if r.policy is Policy.TRACK and not r.vma.anonymous
                                          and not r.vma.shared])
        if lost:
            self._check_target()  # an exiting target tears its VMAs down under us
            raise TrackerError(
                f"pid {self.pid}: memory layout kept changing during the harvest", pid=self.pid, errno=errno.EAGAIN
            )
        problems.extend(self._busy.values())
        # Registration may merge VMAs (brk growth): the next round compares with the layout as it is now.
        return out, fresh, problems, read_maps(self.pid) if changed else maps

    def _scan_tracked(
        self, pagemap: int, spans: np.ndarray, masks: np.ndarray, split: list[bool]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uffd.scan_ranges (get + re-protect) of the tracked VMAs. While a thread of the target holds a CPU, each
        2 MiB block re-protected costs an interrupt of that CPU (docs/kernel.md rule 37). The scan starts unpaused
        and looks at its own speed: when it is much slower than a paused scan, it goes on in windows of at most
        ``self.pause`` seconds with the running threads stopped (freeze.Pause), each followed by at least as long
        with them running while the scan goes on unpaused. ``split``: VMAs that may be scanned in pieces
        (anonymous: no hugetlb page to cut, rule 6)."""
        if self.pause <= 0 or self.round == 0 or not len(spans) or freeze.active(self.pid) is not None:
            return uffd.scan_ranges(pagemap, spans, masks, self._buf)
        if not freeze.running_threads(self.pid):  # none holds a CPU: no interrupt to fear, the rate to learn
            return self._scan_timed(pagemap, spans, masks, paused=True)
        pieces, owner = _pieces(spans, np.asarray(split, dtype=bool), _PIECE)
        pmasks = masks[owner]
        ends = np.cumsum((pieces[:, 1] - pieces[:, 0]).astype(np.float64))
        starts = np.concatenate(([0.0], ends[:-1]))

        def upto(i: int, nbytes: float) -> int:
            """The end of the pieces from i that make about ``nbytes`` (at least one)."""
            return max(i + 1, int(np.searchsorted(ends, starts[i] + nbytes, "right")))

        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        pause = freeze.Pause(self.pid)
        nice: int | None = None
        i, n, probe, unpaused_until = 0, len(pieces), float(_PROBE), 0.0
        slow = _SLOWER <= 0  # 0: pause whenever a thread runs, without looking at the scan's speed first
        try:
            while i < n:
                if not slow or time.perf_counter() < unpaused_until:
                    # unpaused: is the scan paying for flush interrupts? (also how the target's time to run is spent)
                    j = upto(i, probe)
                    t1 = time.perf_counter()
                    parts.append(self._scan_timed(pagemap, pieces[i:j], pmasks[i:j], paused=False))
                    took = time.perf_counter() - t1
                    slow = _SLOWER <= 0 or took > _SLOWER * ((ends[j - 1] - starts[i]) / self._rate + 50e-6)
                    probe = float(_PIECE) if slow else probe * 2  # fast: no thread on a CPU, or little written
                    i = j
                    continue
                if not pause.stop():  # no thread runs now
                    slow = False
                    continue
                if nice is None:  # only while it pauses: at nice -10 it would crowd a thread sharing its CPU
                    nice = _raise_priority()
                try:
                    first = i
                    while i < n:
                        left = self.pause - (time.perf_counter() - pause.since)
                        if left <= 0 and i > first:  # one piece at least: every window makes progress
                            break
                        j = upto(i, self._rate * left * 0.5)  # what fits in the window at the rate measured
                        parts.append(self._scan_timed(pagemap, pieces[i:j], pmasks[i:j], paused=True))
                        i = j
                finally:
                    took = pause.resume()
                unpaused_until = time.perf_counter() + took  # the target runs at least as long as it was paused
        finally:
            pause.resume()
            self._stalls.extend(pause.stalls)
            if nice is not None:
                _restore_priority(nice)
        return _join_pieces(parts, owner, len(spans))

    def _scan_timed(
        self, pagemap: int, spans: np.ndarray, masks: np.ndarray, paused: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uffd.scan_ranges; a scan without flush interrupts (``paused``: the target's running threads stopped,
        or none ran) measures the rate that sizes pause windows and tells a slow scan."""
        t0 = time.perf_counter()
        out = uffd.scan_ranges(pagemap, spans, masks, self._buf)
        took = time.perf_counter() - t0
        nbytes = float((spans[:, 1] - spans[:, 0]).sum()) if len(spans) else 0.0
        if paused and nbytes >= _PIECE and took > 0:
            # interference (this thread preempted) only ever slows a scan: a slow sample lowers the rate a little
            self._rate = max(1e9, nbytes / took, 0.75 * self._rate)
        return out

    def _track_new_many(self, pagemap: int, vs: list[Vma], fresh: set) -> list[VmaPages | None]:
        """:meth:`_track_new` of many VMAs: its common course (unregistered, registers cleanly, scans) in two
        native scan loops; any other outcome goes through _track_new itself, one VMA at a time."""
        out: list[VmaPages | None] = [None] * len(vs)
        spans = np.array([(v.start, v.end) for v in vs], dtype=np.uint64).reshape(-1, 2)
        masks = np.full(len(vs), uffd.CLASSIFY_MASK, dtype=np.uint64)
        _, _, first = uffd.scan_ranges(pagemap, spans, masks, self._buf)
        new: list[int] = []
        slow: list[int] = []
        for i, err in enumerate(first.tolist()):
            v = vs[i]
            if err == errno.EPERM and self._try_register(v):
                fresh.add((v.start, v.end))
                new.append(i)
            else:
                slow.append(i)
        if new:
            # Right after registration every page reads WRITTEN (docs/kernel.md rules 1-2): this scan
            # write-protects each VMA and lists every page, present (copy) or not (zero).
            regions, counts, errs = uffd.scan_ranges(pagemap, spans[new], masks[new], self._buf)
            for j in np.flatnonzero(errs).tolist():
                if errs[j] != errno.EPERM:  # EPERM: the layout changed meanwhile (None)
                    raise self._error(from_errno(int(errs[j]), self.pid, "PAGEMAP_SCAN"))
            ok = errs == 0
            done = [new[j] for j in np.flatnonzero(ok).tolist()]
            for i, res in zip(done, classify_many([vs[i] for i in done], regions, counts[ok], Policy.TRACK,
                                                   whole=True), strict=True):
                res.zero = ranges.EMPTY
                out[i] = res
        for i in slow:
            out[i] = self._track_new(pagemap, vs[i], fresh)
        return out

    def _track_new(self, pagemap: int, v: Vma, fresh: set) -> VmaPages | None:
        """Register ``v`` if needed and report all of it; None when the layout changed meanwhile."""
        try:
            uffd.scan_all(pagemap, v.start, v.end, self._buf, pid=self.pid)
        except WpdumpError as e:
            if e.errno != errno.EPERM:
                raise self._error(e) from None
            try:
                uffd.register_wp(self._uffd, v.start, v.end, pid=self.pid)
            except WpdumpError as e:
                if e.errno == errno.EBUSY:
                    busy = RangeBusy(v.start, v.end, v.path, pid=self.pid, errno=errno.EBUSY)
                    log.warning("%s", busy)
                    self._busy[(v.start, v.end)] = busy
                    return self._whole(pagemap, v, Policy.WHOLE)
                if e.errno == errno.EINVAL:
                    self._policy[self._key(v)] = (Policy.WHOLE, "the kernel refuses to register it")
                    return self._whole(pagemap, v, Policy.WHOLE)
                if e.errno in (errno.ENOMEM, errno.ENOENT):
                    self._check_target()
                    return None
                raise self._error(e) from None
            fresh.add((v.start, v.end))
            # Right after registration every page reads WRITTEN (docs/kernel.md rules 1-2): this scan
            # write-protects the whole VMA and lists every page, present (copy) or not (zero).
            try:
                regions = uffd.scan_all(pagemap, v.start, v.end, self._buf, pid=self.pid)
            except WpdumpError as e:
                if e.errno == errno.EPERM:
                    return None
                raise self._error(e) from None
            res = classify(v, regions, Policy.TRACK, whole=True)
            res.zero = ranges.EMPTY
            return res
        # Registered, but an earlier call lost its dirty information: re-protected above, now report
        # every page with content.
        return self._present(pagemap, v, Policy.TRACK)

    def _find_reverted(self, pagemap: int, results: list[VmaPages]) -> None:
        """A zapped COW page of a private file mapping shows the file again but is not reported
        written (the kernel keeps its WP marker): find it as a COW page that is one no more."""
        if not results:
            return
        spans = np.array([(r.vma.start, r.vma.end) for r in results], dtype=np.uint64)
        masks = np.full(len(results), uffd.CLASSIFY_MASK, dtype=np.uint64)
        cow, counts, errs = uffd.scan_ranges(
            pagemap, spans, masks, self._buf, flags=0, category_mask=PAGE_IS_FILE,
            category_inverted=PAGE_IS_FILE, category_anyof_mask=PAGE_IS_PRESENT,
        )  # not SWAPPED: uffd-wp markers on never-COWed pages read as SWAPPED without FILE
        for i in np.flatnonzero(errs).tolist():
            raise self._error(from_errno(int(errs[i]), self.pid, "PAGEMAP_SCAN"))
        rows = np.column_stack((cow["start"], cow["end"])).astype(np.uint64)
        if len(rows) and not (rows[1:, 0] >= rows[:-1, 1]).all():  # not in address order after all
            ends = np.cumsum(counts).tolist()
            parts = [ranges.merge(rows[e - c : e]) for c, e in zip(counts.tolist(), ends, strict=True)]
        else:
            merged, b = _split_by_vma(rows, np.repeat(np.arange(len(results)), counts), len(results))
            parts = [merged[b[i] : b[i + 1]] for i in range(len(results))]
        for res, now in zip(results, parts, strict=True):
            v = res.vma
            before = self._cow.pop((v.start, v.end), None)
            if len(now):  # an empty set compares like none: keep the state small with many VMAs
                self._cow[(v.start, v.end)] = now
            if before is not None and len(before) and not res.whole:  # whole: nothing it lists is file content
                lost = ranges.subtract(ranges.subtract(before, now), res.copy)
                if len(lost):
                    res.reverted = ranges.merge(np.concatenate((res.reverted, lost)))

    def _whole(self, pagemap: int, v: Vma, pol: Policy) -> VmaPages:
        """Report all content of a VMA that is not (or cannot be) tracked."""
        if v.shared:
            data = self._shared_data(v)
            if data is not None:
                return VmaPages(v, pol, data, whole=True)
        return self._present(pagemap, v, pol)

    def _present(self, pagemap: int, v: Vma, pol: Policy) -> VmaPages:
        try:
            regions = uffd.scan_all(
                pagemap, v.start, v.end, self._buf, flags=0, category_mask=0,
                category_anyof_mask=PAGE_IS_PRESENT | PAGE_IS_SWAPPED, pid=self.pid,
            )
        except WpdumpError as e:
            raise self._error(e) from None
        res = classify(v, regions, pol, whole=True)
        res.zero = ranges.EMPTY
        return res

    def _shared_data(self, v: Vma) -> np.ndarray | None:
        """Ranges of a shared mapping whose object holds data (SEEK_DATA on map_files), or None."""
        try:
            fd = open_proc(self.pid, f"map_files/{v.start:x}-{v.end:x}")
        except WpdumpError:
            return None
        try:
            out, pos, end = [], v.offset, v.offset + v.size
            while pos < end:
                try:
                    d = os.lseek(fd, pos, SEEK_DATA)
                except OSError:
                    break
                if d >= end:
                    break
                h = min(os.lseek(fd, d, SEEK_HOLE), end)
                lo = d & ~(PAGE - 1)
                hi = (h + PAGE - 1) & ~(PAGE - 1)
                out.append((v.start + lo - v.offset, v.start + min(hi, end) - v.offset))
                pos = h
            return ranges.from_pairs(out)
        except OSError:
            return None
        finally:
            os.close(fd)

    def _in_flight(self) -> tuple[dict[int, str], pinned.InFlight]:
        fds = procfds.fd_targets(self.pid)
        return fds, pinned.in_flight(self.pid, threads(self.pid), fds)

    def _add_pinned(self, out: list[VmaPages], before: tuple[dict[int, str], pinned.InFlight] | None) -> list[str]:
        """Pages the kernel may write unreported: io_uring fixed buffers (docs/kernel.md rule 7), copied every
        round, and buffers of reads in flight at this round or the last one (pinned.py). Returns warnings."""
        if before is None:
            return []
        fds, now = self._in_flight()
        warnings = list(dict.fromkeys(before[1].warnings + now.warnings))
        inflight = ranges.union(before[1].ranges, now.ranges)
        bufs = ranges.union(ranges.from_pairs(iouring.registered_buffers(self.pid, fds)), inflight, self._inflight)
        self._inflight = inflight
        own = procfds.userfaultfds(self.pid, fds)
        if own and not self._busy_allowed:
            warnings.append(
                f"pid {self.pid} opened a userfaultfd (fd {own[0]}) while tracked: its UFFDIO_REGISTER on tracked "
                "memory fails with EBUSY until tracking ends"
            )
        if not len(bufs):
            return warnings
        spans = np.array([(p.vma.start, p.vma.end) for p in out], dtype=np.uint64).reshape(-1, 2)
        for i in np.flatnonzero(ranges.overlaps(spans, bufs)).tolist():  # not every VMA against every buffer
            p = out[i]
            p.copy = ranges.merge(np.concatenate((p.copy, ranges.clip_sorted(bufs, p.vma.start, p.vma.end))))
        return warnings

    def _check_other_userfaultfds(self, allow_userfaultfd_target: bool) -> None:
        """Refuse a target whose VMAs another userfaultfd write-protects (a second tracker would steal the
        dirty bits: its scans pass PM_SCAN_CHECK_WPASYNC) or, unless allowed, that uses userfaultfd itself."""
        own = procfds.userfaultfds(self.pid)
        self._busy_allowed = allow_userfaultfd_target
        if own and not allow_userfaultfd_target:
            raise TargetUsesUserfaultfd(
                f"pid {self.pid} uses userfaultfd itself (fd {own[0]}): while tracked, its UFFDIO_REGISTER on its "
                "memory fails with EBUSY (one userfaultfd per VMA); pass --allow-userfaultfd-target to track it "
                "anyway (what it registers is then dumped whole every round)", pid=self.pid, errno=errno.EBUSY,
            )
        flags = read_vmflags(self.pid)
        maps = {v.start: v for v in read_maps(self.pid)}
        wp = [maps[a] for a, f in sorted(flags.items()) if "uw" in f and a in maps]
        if not wp:
            return
        if not own:
            raise AlreadyTracked(
                f"pid {self.pid} is already tracked by another userfaultfd (another wpdump tracker, e.g. a keeper "
                f"under another WPDUMP_RUN_DIR, or another write-protect user): {len(wp)} VMAs are write-protected, "
                f"first {wp[0]}; two trackers would each miss the writes the other harvested",
                pid=self.pid, errno=errno.EBUSY,
            )
        for v in wp:  # the target's own write-protect ranges: never scan them with WP_MATCHING
            self._busy[(v.start, v.end)] = RangeBusy(v.start, v.end, v.path, pid=self.pid, errno=errno.EBUSY)

    # ---- helpers ----

    def _key(self, v: Vma) -> tuple:
        return v  # every field of its maps line: addresses, protection, offset, identity

    def _prune(self, layout: list[Vma]) -> None:
        """Forget policies and COW sets of VMAs gone: a churning target must not grow them (and the state
        handed to the keeper) round after round. Amortised O(1) per VMA."""
        if len(self._policy) + len(self._cow) <= 2 * len(layout) + 64:
            return
        live = set(layout)
        self._policy = {k: p for k, p in self._policy.items() if k in live}
        spans = {(v.start, v.end) for v in layout}
        self._cow = {k: c for k, c in self._cow.items() if k in spans}

    def _vmflags_for(self, maps: list[Vma]) -> dict[int, frozenset[str]]:
        if all(self._key(v) in self._policy for v in maps):
            return {}
        return read_vmflags(self.pid)

    def _policy_of(self, v: Vma, flags: dict[int, frozenset[str]]) -> tuple[Policy, str]:
        key = self._key(v)
        pol = self._policy.get(key)
        if pol is None:
            pol = self._policy[key] = policy_for(v, flags.get(v.start, frozenset()))
        return pol

    def policies(self) -> list[tuple[Vma, Policy, str]]:
        """Every VMA of the last round with its policy and the reason for it."""
        return [(v, *self._policy.get(self._key(v), (Policy.TRACK, "tracked"))) for v in self._layout]

    def _check_target(self, layout: list[Vma] | None = None) -> None:
        """Raise TargetExited / TargetExeced if the target is not the process we attached to."""
        try:
            st = read_stat(self.pid)
        except NoSuchProcess:
            raise TargetExited(f"target {self.pid} exited", pid=self.pid, errno=errno.ESRCH) from None
        if st.state in ("Z", "X", "x") or st.start_ticks != self.start_ticks:
            raise TargetExited(f"target {self.pid} exited", pid=self.pid, errno=errno.ESRCH)
        # The userfaultfd belongs to the attach-time mm: an unprotect of one page answers ESRCH once
        # that mm is gone (docs/kernel.md rule 14) and a harmless ENOENT/EINVAL otherwise.
        probe = self._probe_addr(self._layout if layout is None else layout)
        try:
            uffd.writeprotect(self._uffd, probe, probe + PAGE, protect=False, pid=self.pid)
            r = 0
        except WpdumpError as e:
            r = e.errno
        if r == errno.ESRCH:
            if self._exiting():
                raise TargetExited(f"target {self.pid} exited", pid=self.pid, errno=errno.ESRCH)
            raise TargetExeced(
                f"target {self.pid} called execve: its tracked memory was replaced", pid=self.pid,
                errno=errno.ESRCH,
            )

    def _exiting(self) -> bool:
        """True while the target is exiting: its mm is gone (empty maps) or it is a zombie already."""
        try:
            if read_stat(self.pid).state in ("Z", "X", "x"):
                return True
            return not read_maps(self.pid)
        except NoSuchProcess:
            return True

    @staticmethod
    def _probe_addr(layout: list[Vma]) -> int:
        """A page in a gap of the layout: never registered, so unprotecting it changes nothing."""
        addr = 0x10000
        for v in layout:
            if v.start > addr:
                break
            addr = max(addr, v.end)
        return addr

    def _error(self, e: WpdumpError) -> WpdumpError:
        """``e`` from a kernel operation on the target, unless the target exited or exec'd (raised instead)."""
        if e.errno in (errno.ESRCH, errno.ENOENT):
            self._check_target()
        return e

    def _try_register(self, v: Vma) -> bool:
        """Register ``v`` for write-protection; False on any error (the caller takes the careful path)."""
        try:
            uffd.register_wp(self._uffd, v.start, v.end, pid=self.pid)
        except WpdumpError:
            return False
        return True

    # ---- before someone else reads the target's page tables (CRIU) ----

    def unmark_empty(self) -> int:
        """Remove the write-protect markers from the empty pages of tracked VMAs: to CRIU a marker reads as
        a swapped page (docs/kernel.md rule 17). Returns the bytes unmarked.

        No write is lost and the dirty set is not consumed: an unprotected page reads WRITTEN (rules 1, 17),
        so the next harvest reports it (an empty page as zero or file content, a page written meanwhile
        with its data). Only pages this tracker registered are touched: another userfaultfd of the same mm
        (the target's own, a busy range) would lose its markers too (docs/kernel.md rule 23).
        """
        if self._uffd < 0:
            raise TrackerError(f"tracker of pid {self.pid} is closed", pid=self.pid)
        self._check_target()
        pagemap = self._open_pagemap()
        # ours: VMAs registered at the last harvest (registration does not follow new mappings, rule 3)
        ours = ranges.subtract(
            ranges.from_pairs([(v.start, v.end) for v in self._layout
                               if self._policy.get(self._key(v), (Policy.SKIP,))[0] is Policy.TRACK]),
            ranges.from_pairs(list(self._busy)),
        )
        done = 0
        try:
            swapped = self._swap_entries()
            mapped = ranges.merge(ranges.from_pairs([(v.start, v.end) for v in read_maps(self.pid)]))
            # a scan without WP_MATCHING may cross VMAs (rule 4 is about re-protecting): one call per span
            for s, e in ranges.intersect(ours, mapped).tolist():
                # not present, not written, "swapped": uffd-wp markers (and protected real swap entries)
                try:
                    found = uffd.scan_all(
                        pagemap, s, e, self._buf, flags=0,
                        category_mask=PAGE_IS_PRESENT | uffd.PAGE_IS_WRITTEN | PAGE_IS_SWAPPED,
                        category_inverted=PAGE_IS_PRESENT | uffd.PAGE_IS_WRITTEN, return_mask=PAGE_IS_SWAPPED,
                        pid=self.pid,
                    )
                except WpdumpError as err:
                    raise self._error(err) from None
                todo = _coalesce(np.column_stack((found["start"], found["end"])).astype(np.uint64))
                if swapped:
                    todo = _markers_only(pagemap, todo)
                for a, b in todo.tolist():
                    failed: WpdumpError | None = None
                    for _ in range(_RETRIES):  # EAGAIN: the mm is changing (mremap, fork)
                        try:
                            uffd.writeprotect(self._uffd, a, b, protect=False, pid=self.pid)
                            failed = None
                            break
                        except WpdumpError as err:
                            failed = err
                            if err.errno != errno.EAGAIN:
                                break
                    if failed is not None and failed.errno == errno.ENOENT:  # unmapped or replaced since the scan
                        continue
                    if failed is not None:
                        raise self._error(failed)
                    done += b - a
        finally:
            os.close(pagemap)
        return done

    def _swap_entries(self) -> bool:
        """Whether the target has pages in swap (VmSwap): only then can a "swapped" page be a real one."""
        try:
            text = read_proc_text(self.pid, "status")
        except NoSuchProcess:
            raise TargetExited(f"target {self.pid} exited", pid=self.pid, errno=errno.ESRCH) from None
        for line in text.splitlines():
            if line.startswith("VmSwap:"):
                return int(line.split()[1]) > 0
        return True

    def _open_pagemap(self) -> int:
        """/proc/PID/pagemap, reopened each round: after execve an old fd shows an empty mm (no error)."""
        try:
            return open_proc(self.pid, "pagemap")
        except NoSuchProcess:
            raise TargetExited(f"target {self.pid} exited", pid=self.pid, errno=errno.ESRCH) from None


_PM_SWAP = 1 << 62
_PM_FRAME = (1 << 55) - 1
_SWP_PTE_MARKER = 31  # swap type of a pte marker in /proc/PID/pagemap (docs/kernel.md rule 23)
_PM_CHUNK = 1 << 18  # pagemap entries read at once (2 MiB)


def _markers_only(pagemap: int, r: np.ndarray) -> np.ndarray:
    """The pages of ``r`` that are no real swap entry in /proc/PID/pagemap (docs/kernel.md rule 23): a
    marker shows swap type 31; without CAP_SYS_ADMIN the type reads 0 and every page counts as a marker
    (unprotecting a real swapped page only makes the next harvest copy it)."""
    out = []
    for s, e in r.tolist():
        for lo in range(s, e, _PM_CHUNK * PAGE):
            hi = min(e, lo + _PM_CHUNK * PAGE)
            n = (hi - lo) // PAGE
            raw = os.pread(pagemap, n * 8, lo // PAGE * 8)
            ent = np.frombuffer(raw, dtype=np.uint64)
            frame = ent & np.uint64(_PM_FRAME)
            real = ((ent & np.uint64(_PM_SWAP)) != 0) & (frame != 0) & ((frame & np.uint64(31)) != _SWP_PTE_MARKER)
            keep = np.concatenate(([False], ~real, [False]))
            edges = np.flatnonzero(keep[1:] != keep[:-1])
            starts, ends = edges[0::2], edges[1::2]
            out.extend(zip((lo + starts * PAGE).tolist(), (lo + ends * PAGE).tolist(), strict=True))
    return ranges.from_pairs(out)
