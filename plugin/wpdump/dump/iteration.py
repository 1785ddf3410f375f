"""One iteration (pre-dump or final dump): harvest the tracker, copy the pages, write CRIU images atomically.

An iteration's pagemap lists every non-zero page of the dumped memory: PE_PRESENT for the pages in its
pages file (changed since the parent, or new), PE_PARENT for pages unchanged since the parent.
"""

from __future__ import annotations

import errno
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import numpy as np

from .. import ranges
from ..errors import NoSuchProcess, UnreadableMemory, WpdumpError
from ..images import format as images
from ..images import imgdir
from ..images.chain import (
    META_FILE,
    META_FORMAT,
    Iteration,
    TreeParent,
    boot_id,
    load_parent_tree,
    meta_json,
    remember_pagemap,
    same_process,
    uptime_us,
)
from ..ranges import PAGE
from ..target import freeze
from ..target.process import check_alive, read_proc
from ..target.tree import Member, read_tree
from ..target.vmas import SECRETMEM, Policy, Vma, parse_maps_line
from ..tracking import keeper
from ..tracking.session import Tracking
from ..tracking.tracker import Harvest, gc_paused
from . import pages, shared
from .pages import Progress

log = logging.getLogger("wpdump.iteration")

PAGES_ID = 1
_POLICY_NAMES = {p: p.value for p in Policy}  # Enum.value is a slow descriptor: 30,000 VMAs take 0.1 s

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
    processes: int = 0
    harvest_s: float = 0.0
    copy_s: float = 0.0
    write_s: float = 0.0
    freezing_s: float = 0.0
    frozen_s: float = 0.0
    total_s: float = 0.0
    warnings: list[str] = field(default_factory=list)
    # (file name, pages id, entries) of each pagemap written: the next iteration's parent, kept decoded
    pagemaps: list[tuple[str, int, np.ndarray]] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), list) else v
                for f in fields(self) if f.name != "pagemaps"}


# ---- laying out and writing the images ----


def _write_images(
    st: imgdir.Staging, m: Member, pages_id: int, h: Harvest, res: IterationResult, parent: np.ndarray | None,
    progress: Progress | None, frozen: Callable[[], None] | None,
) -> dict:
    """Write the pages and pagemap of one process into the staging directory (its shared mappings are written
    once per object: dump/shared.py); returns its stats."""
    own = shared.shared_ranges(h)
    copy = ranges.subtract(ranges.merge(h.copy_ranges()), own) if len(own) else ranges.merge(h.copy_ranges())
    anon = ranges.from_pairs([(v.vma.start, v.vma.end) for v in h.vmas if v.vma.anonymous])
    unreadable = ranges.from_pairs([(v.vma.start, v.vma.end) for v in h.vmas if v.vma.perms[0] != "r"])
    pages_name = images.pages_file_name(pages_id)
    fd = st.create(pages_name)
    try:
        written, zero_dropped, copy_s, write_s = pages.copy_and_write(
            m.pid, copy, anon, fd, os.path.join(st.dest, pages_name), progress, unreadable
        )
    except BaseException:
        os.close(fd)
        raise
    st.keep(fd, pages_name)  # fsynced at the commit, at once with the other files
    if frozen is not None:
        frozen()  # every page is read: the tree may run again
    t0 = time.perf_counter()
    keep = h.unchanged(parent, written) if parent is not None and len(parent) else ranges.EMPTY
    if len(own) and len(keep):
        keep = ranges.subtract(keep, own)
    entries = images.entries_from_ranges(written, keep)
    st.write_file(images.pagemap_file_name(m.vpid), images.encode_pagemap(pages_id, entries))
    res.pagemaps.append((images.pagemap_file_name(m.vpid), pages_id, entries))
    stats = {
        "pages_scanned": sum(v.vma.size for v in h.vmas) // PAGE, "pages_written": ranges.total(written) // PAGE,
        "pages_skipped_parent": ranges.total(keep) // PAGE,
        "pages_zeroed": ranges.total(h.zero_ranges()) // PAGE + zero_dropped,
    }
    res.pages_scanned += stats["pages_scanned"]
    res.pages_written += stats["pages_written"]
    res.pages_parent += stats["pages_skipped_parent"]
    res.pages_zeroed += stats["pages_zeroed"]
    res.bytes_written += ranges.total(written)
    res.copy_s += copy_s
    res.write_s += write_s + time.perf_counter() - t0
    return stats


def _stats_file(st: imgdir.Staging, res: IterationResult) -> dict:
    """stats-dump, as CRIU fills it for the whole tree."""
    stats = {
        "freezing_time": int(res.freezing_s * 1e6), "frozen_time": int(res.frozen_s * 1e6),
        "memdump_time": int((res.harvest_s + res.copy_s) * 1e6), "memwrite_time": int(res.write_s * 1e6),
        "pages_scanned": res.pages_scanned, "pages_skipped_parent": res.pages_parent,
        "pages_written": res.pages_written,
    }
    st.write_file(images.STATS_FILE, images.encode_stats(**stats))
    return stats


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


def _secret_vmas(pid: int) -> list[Vma]:
    """The memfd_secret VMAs of ``pid`` (maps parsed only when it names one)."""
    data = read_proc(pid, "maps")
    if SECRETMEM.encode() not in data:
        return []
    return [v for v in map(parse_maps_line, data.decode().splitlines()) if v.secret]


def _member_parent(parent: TreeParent | None, m: Member) -> Iteration | None:
    """The parent's image of ``m``: None when the parent holds none of this very process (a new process, or
    its vpid reused by another: never refer to the old one's pages)."""
    if parent is None:
        return None
    it = parent.members.get(m.vpid)
    if it is None or it.meta is None or not same_process(it.meta, m.start_ticks, m.pid):
        return None
    return it


@gc_paused()
def run(
    pid: int, images_dir: str, prev_images_dir: str | None = None, *, final: bool = False,
    leave_stopped: bool = False, keep_tracking: bool | None = None, progress: Progress | None = None,
    allow_userfaultfd_target: bool = False, allow_unreadable: bool = False, single: bool = False,
) -> IterationResult:
    """Write one iteration of the tree rooted at ``pid`` (``single``: that process alone) into ``images_dir``:
    a pre-dump, or with ``final`` the dump with the whole tree frozen."""
    t_start = time.perf_counter()
    st_target = check_alive(pid)
    dest = imgdir.check_destination(images_dir)
    members = read_tree(pid, single)
    parent: TreeParent | None = None
    if prev_images_dir:
        parent = load_parent_tree(_resolve_prev(dest, prev_images_dir), pid, st_target.start_ticks, members[0].vpid)
    if keep_tracking is None:
        keep_tracking = not final
    res = IterationResult(dest, "dump" if final else "pre-dump", uuid.uuid4().hex, prev_images_dir, False)
    for m in members:  # before attaching: refuse early
        try:
            _check_readable(m.pid, _secret_vmas(m.pid), allow_unreadable, [])
        except NoSuchProcess:
            if m.pid == pid:
                raise
    with keeper.pid_lock(pid), imgdir.Staging(dest) as st:
        # the files this iteration will most likely write, created in a thread while the tracking is taken over
        st.prepare([images.pages_file_name(i + 1) for i in range(len(members))]
                   + [images.pagemap_file_name(m.vpid) for m in members]
                   + [images.STATS_FILE, images.INVENTORY_FILE, META_FILE], prev_images_dir)
        tracking: Tracking | None = None
        thawed = True
        t_frozen = 0.0
        freezer: freeze.TreeFreezer | None = None

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
            tracking = Tracking(pid, st_target.start_ticks, parent.top if parent else None, res.warnings,
                                allow_userfaultfd_target)
            if final:
                t_frozen = time.perf_counter()
                thawed = False
                freezer = freeze.TreeFreezer(pid, single)
                res.freezing_s = freezer.seconds
                members = freezer.members
            dump_uptime = uptime_us()
            procs: dict[str, dict] = {}
            done: list[Member] = []
            incremental = parent is not None
            harvested: list[tuple[int, Member, Harvest, Iteration | None]] = []

            def left_out(m: Member) -> None:
                """A process that exited during a pre-dump is not part of the tree any more; else it is an error."""
                if final or m.pid == pid:
                    raise
                log.info("pid %d exited during the iteration: left out", m.pid)

            with freeze.Attaching():  # the processes new to tracking are attached by one ptrace agent
                for i, m in enumerate(members):
                    mp = _member_parent(parent, m)
                    try:
                        t0 = time.perf_counter()
                        h = tracking.harvest(m, full=mp is None)  # nothing to refer to: all its pages
                        res.harvest_s += time.perf_counter() - t0
                        _check_readable(m.pid, h.unreadable, allow_unreadable, res.warnings)
                    except NoSuchProcess:
                        left_out(m)
                        continue
                    res.warnings.extend(h.warnings)
                    harvested.append((i, m, h, mp))
            objs = shared.collect([(m, h) for _, m, h, _ in harvested])
            for k, (i, m, h, mp) in enumerate(harvested):
                last = k == len(harvested) - 1 and not objs
                inc = mp is not None and tracking.incremental(m)
                try:
                    stats = _write_images(st, m, i + 1, h, res, mp.ranges() if inc else None, progress,
                                          thaw if final and last else None)
                except NoSuchProcess:
                    left_out(m)
                    st.remove(images.pages_file_name(i + 1))
                    continue
                incremental = incremental and (inc or mp is None)  # a process new since the parent is full
                done.append(m)
                procs[str(m.vpid)] = {
                    "pid": m.pid, "vpid": m.vpid, "ppid": m.ppid, "start_ticks": m.start_ticks, "pages_id": i + 1,
                    "incremental": inc, "stats": stats,
                    # the dumped VMAs at harvest time: restore-memory checks the layout against them
                    "vmas": [[v.vma.start, v.vma.end, v.vma.perms, v.vma.offset, v.vma.path, _POLICY_NAMES[v.policy]]
                             for v in h.vmas],
                    "lost": [[v.start, v.end, v.path] for v in h.unreadable],
                }
            gone = {m.pid for _, m, _, _ in harvested} - {m.pid for m in done}
            objs = {k: [mp for mp in maps if mp.member.pid not in gone] for k, maps in objs.items()}
            sh = shared.write_objects(st, {k: v for k, v in objs.items() if v}, len(members) + 1, progress,
                                      strict=final, frozen=thaw if final else None)
            res.pages_written += sh.pages_written
            res.bytes_written += sh.pages_written * PAGE
            res.copy_s += sh.copy_s
            res.write_s += sh.write_s
            for m in done:
                procs[str(m.vpid)]["shared"] = sh.windows.get(m.pid, [])
            thaw()
            res.incremental = incremental
            res.processes = len(done)
            stats = _stats_file(st, res)
            st.write_file(images.INVENTORY_FILE, images.encode_inventory(dump_uptime, pre_dump=not final))
            if prev_images_dir:
                st.symlink(prev_images_dir)
            res.total_s = time.perf_counter() - t_start
            root = procs[str(members[0].vpid)]
            meta = {
                "format": META_FORMAT, "pid": pid, "vpid": root["vpid"], "start_ticks": st_target.start_ticks,
                "boot_id": boot_id(), "single": single, "iteration": res.iteration,
                "parent_iteration": parent.top.iteration_id if parent else None,
                "kind": res.kind, "incremental": res.incremental, "created": time.time(), "stats": stats,
                "result": res.as_dict(), "shared_objects": sh.objects, "processes": procs,
            }
            st.write_file(META_FILE, meta_json(meta))
            if keep_tracking:  # the keeper takes the trackers while the files are synced (a failed commit untracks)
                tracking.send_back(done, res.iteration, dest)
            st.commit()
            for name, pages_id, entries in res.pagemaps:
                remember_pagemap(os.path.join(dest, name), pages_id, entries)
            res.pagemaps = []
        except BaseException:
            thaw(done=False)
            if tracking is not None:
                tracking.abandon()
            raise
        try:
            tracking.hand_back(done, res.iteration, dest, keep_tracking)
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
