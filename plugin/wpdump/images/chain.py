"""Reading iterations and the chain of ``parent`` links between them, and checking a parent is usable."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import stat
import time
from dataclasses import dataclass

import numpy as np

from .. import ranges
from ..errors import ChainError
from ..ranges import PAGE, in_ranges
from . import format as images
from .imgdir import MAX_DEPTH, parent_of, stat_dir, walk_links
from .shared import SharedImages

META_FILE = "wpdump.json"
META_FORMAT = "wpdump-iteration/2"  # /2: a tree, one entry per process under "processes"
META_FORMATS = ("wpdump-iteration/1", META_FORMAT)


def uptime_us() -> int:
    """Microseconds since boot (CLOCK_BOOTTIME, as /proc/uptime and /proc/PID/stat start times)."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1000


def start_time_us(start_ticks: int) -> int:
    """A /proc/PID/stat start time (clock ticks since boot) in microseconds."""
    return start_ticks * 1_000_000 // os.sysconf("SC_CLK_TCK")


@functools.cache
def boot_id() -> str:
    """This boot's id (read once: a process does not outlive its boot)."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def read_image_file(dir_path: str, name: str) -> bytes:
    """Contents of ``dir_path/name``, never following a symlink at ``name``."""
    path = os.path.join(dir_path, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ChainError(f"{path}: no such file", errno=errno.ENOENT) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ChainError(f"{path} is a symlink: refusing to follow it", errno=e.errno) from None
        raise ChainError(f"{path}: {e.strerror}", errno=e.errno) from None
    try:
        with os.fdopen(fd, "rb") as f:
            return f.read()
    except OSError as e:
        raise ChainError(f"{path}: {e.strerror}", errno=e.errno) from None


@dataclass
class Iteration:
    """One images directory: its pagemap entries, inventory and wpdump's metadata (None if not ours)."""

    path: str
    pid: int
    pages_id: int
    entries: np.ndarray
    inventory: object | None
    meta: dict | None
    shared: SharedImages | None = None  # the shared objects the process maps (tree iterations)

    def ranges(self, flag: int | None = None) -> np.ndarray:
        """Page ranges of the entries (with ``flag`` if given)."""
        return images.ranges_of(self.entries, flag)

    @property
    def pages_path(self) -> str:
        return os.path.join(self.path, images.pages_file_name(self.pages_id))

    @property
    def parent_path(self) -> str | None:
        """The directory the ``parent`` link points to, or None when there is no link."""
        return parent_of(self.path)

    @property
    def iteration_id(self) -> str | None:
        return self.meta.get("iteration") if self.meta else None


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError as e:
        raise ChainError(f"images directory {path}: {e.strerror}", errno=e.errno) from None


def _pagemap_pids(names: list[str]) -> list[int]:
    return [int(m.group(1)) for n in names if (m := re.fullmatch(r"pagemap-(\d+)\.img", n))]


def checkpoint_iterations(path: str) -> list[str]:
    """The numbered iterations DIR/1, DIR/2, ... that ``wpdump checkpoint`` wrote into ``path``, in order
    (empty when ``path`` is an iteration itself or holds none)."""
    try:
        names = os.listdir(path)
    except OSError:
        return []
    if _pagemap_pids(names):
        return []
    out = []
    for n in sorted((n for n in names if n.isdigit()), key=int):
        with contextlib.suppress(OSError):
            if _pagemap_pids(os.listdir(os.path.join(path, n))):
                out.append(os.path.join(path, n))
    return out


def meta_json(meta: dict) -> bytes:
    """wpdump.json: one line per key, "processes" (each process's VMAs) last. Each value is encoded by json's C
    encoder (with indent, json runs its Python encoder: 0.1-0.3 s for 30,000 VMAs, and ~0.2 ms for one process)."""
    keys = [k for k in meta if k != "processes"] + (["processes"] if "processes" in meta else [])
    return ("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(meta[k])}" for k in keys) + "\n}\n").encode()


_meta_cache: dict[str, tuple[tuple[int, int, int, int], dict]] = {}
# decoded pagemaps by path, valid while the file's signature holds: the parent of an iteration is most often the
# iteration this process wrote just before (its writer puts it here), and decoding it costs ~10 ms at 200,000
# entries. The arrays are read-only.
_pagemap_cache: dict[str, tuple[tuple[int, int, int, int], int, np.ndarray]] = {}
_PAGEMAP_CACHE_BYTES = 64 << 20


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    """What tells one version of a file from another: device, inode, size, modification time (ns)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def remember_pagemap(path: str, pages_id: int, entries: np.ndarray, sig: tuple | None = None) -> None:
    """Keep the decoded pagemap at ``path`` (the file now, or the version ``sig`` names) for load_iteration; the
    ``entries`` array becomes read-only. (The stat that takes the signature makes this kernel give the file's next
    change a fine-grained time: multigrain timestamps, Linux 6.13.)"""
    if sig is None:
        try:
            sig = _signature(os.lstat(path))
        except OSError:
            return
    entries.flags.writeable = False
    _pagemap_cache.pop(path, None)
    _pagemap_cache[path] = (sig, pages_id, entries)
    while sum(e[2].nbytes for e in _pagemap_cache.values()) > _PAGEMAP_CACHE_BYTES and len(_pagemap_cache) > 1:
        del _pagemap_cache[next(iter(_pagemap_cache))]  # the oldest


def read_meta(path: str) -> dict | None:
    """wpdump's metadata of the iteration in ``path`` (None when it is not ours). Parsed once per file version:
    a tree's file lists every process, and each process's image is loaded on its own."""
    name = os.path.join(path, META_FILE)
    try:
        st = os.lstat(name)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ChainError(f"{name}: {e.strerror}", errno=e.errno) from None
    sig = _signature(st)
    hit = _meta_cache.get(name)
    if hit is not None and hit[0] == sig:
        return hit[1]
    meta = _parse_meta(path)
    if len(_meta_cache) > 64:
        _meta_cache.clear()
    _meta_cache[name] = (sig, meta)
    return meta


def _parse_meta(path: str) -> dict:
    try:
        meta = json.loads(read_image_file(path, META_FILE))
        if not isinstance(meta, dict) or meta.get("format") not in META_FORMATS:
            raise ValueError("unknown format")
        if not isinstance(meta.get("processes", {}), dict):
            raise ValueError("bad processes")
    except ValueError as e:
        raise ChainError(f"{os.path.join(path, META_FILE)} is corrupt: {e}", errno=errno.EINVAL) from None
    return meta


def member_meta(meta: dict | None, vpid: int) -> dict | None:
    """The metadata of process ``vpid`` of an iteration: the tree's, with that process's own entry over it
    (its host pid, start time, VMAs); None when the iteration does not list it."""
    if meta is None:
        return None
    procs = meta.get("processes")
    if procs is None:  # one process (format 1)
        return meta
    own = procs.get(str(vpid))
    return None if own is None else {**meta, **own}


def tree_vpids(path: str) -> list[int]:
    """The processes (vpids) of the iteration in ``path``, its root first."""
    vpids = sorted(_pagemap_pids(_listdir(path)))
    meta = read_meta(path)
    root = meta.get("vpid") if meta else None
    if root in vpids:
        vpids.remove(root)
        vpids.insert(0, root)
    return vpids


def _find_pid(path: str) -> int:
    pids = _pagemap_pids(_listdir(path))
    if len(pids) > 1:
        meta = read_meta(path)
        if meta and meta.get("vpid") in pids:
            return meta["vpid"]  # a tree: its root
    if len(pids) != 1:
        what = "no pagemap-PID.img" if not pids else f"pagemaps of several pids {sorted(pids)}; name the pid"
        its = checkpoint_iterations(path) if not pids else []
        if its:
            names = ", ".join(os.path.basename(i) for i in its)
            what += f": it is a checkpoint directory holding the iterations {names}; name one, e.g. {its[-1]}"
        raise ChainError(f"{path}: {what}", errno=errno.ENOENT if not pids else errno.EINVAL)
    return pids[0]


def load_iteration(path: str, pid: int | None = None) -> Iteration:
    """Read the pagemap (and inventory, metadata when present) of the iteration in ``path``."""
    stat_dir(path, pid=pid)
    if pid is None:
        pid = _find_pid(path)
    name = images.pagemap_file_name(pid)
    try:
        sig = _signature(os.lstat(os.path.join(path, name)))
    except FileNotFoundError:
        raise ChainError(f"{path} holds no {name}: not an image of pid {pid}", pid=pid, errno=errno.ENOENT) from None
    except OSError as e:
        raise ChainError(f"{os.path.join(path, name)}: {e.strerror}", pid=pid, errno=e.errno) from None
    try:
        hit = _pagemap_cache.get(os.path.join(path, name))
        if hit is not None and hit[0] == sig:
            pages_id, entries = hit[1], hit[2]
        else:
            pages_id, entries = images.decode_pagemap(read_image_file(path, name), os.path.join(path, name))
            remember_pagemap(os.path.join(path, name), pages_id, entries, sig)
        inv = None
        if os.path.lexists(os.path.join(path, images.INVENTORY_FILE)):
            inv_name = os.path.join(path, images.INVENTORY_FILE)
            inv = images.decode_inventory(read_image_file(path, images.INVENTORY_FILE), inv_name)
    except images.ImageError as e:
        raise ChainError(str(e), pid=pid, errno=errno.EINVAL) from None
    meta = member_meta(read_meta(path), pid)
    return Iteration(path, pid, pages_id, entries, inv, meta, SharedImages.of(path, meta))


def check_pages_file(it: Iteration) -> None:
    """The pages file holds exactly the PE_PRESENT pages."""
    want = ranges.total(it.ranges(images.PE_PRESENT))
    try:
        st = os.lstat(it.pages_path)
    except FileNotFoundError:
        if want == 0:
            return
        raise ChainError(f"{it.pages_path}: missing", pid=it.pid, errno=errno.ENOENT) from None
    if st.st_size != want:
        raise ChainError(
            f"{it.pages_path}: {st.st_size} bytes, but the pagemap lists {want // PAGE} present pages "
            f"({want} bytes)", pid=it.pid, errno=errno.EINVAL,
        )


def missing_in_parent(child: Iteration, parent: Iteration) -> str | None:
    """The problem when PE_PARENT pages of ``child`` are absent from ``parent`` (neither present nor in-parent
    there), else None."""
    missing = ranges.subtract(child.ranges(images.PE_PARENT), parent.ranges())
    if not len(missing):
        return None
    return (f"{child.path}: {ranges.total(missing) // PAGE} pages marked in-parent are absent from the parent "
            f"{parent.path} (first at {int(missing[0, 0]):#x})")


def begins_above(it: Iteration, below: str) -> bool:
    """Whether the process of ``it`` is absent from the iteration ``below`` it and ``it`` refers to nothing there:
    a process new since then (its chain begins at ``it``)."""
    return not len(it.ranges(images.PE_PARENT)) and not os.path.lexists(
        os.path.join(below, images.pagemap_file_name(it.pid)))


def load_chain(path: str, pid: int | None = None) -> list[Iteration]:
    """The iteration in ``path`` and its parents, top first; checks every level's structure."""
    chain: list[Iteration] = []
    for cur, err in walk_links(path, pid):
        if chain and begins_above(chain[-1], cur):
            break
        if err is not None:
            raise err
        it = load_iteration(cur, pid)
        pid = it.pid
        check_pages_file(it)
        if chain:
            gap = missing_in_parent(chain[-1], it)
            if gap:
                raise ChainError(gap, pid=pid, errno=errno.EINVAL)
        chain.append(it)
        if it.parent_path is None and len(it.ranges(images.PE_PARENT)):
            raise ChainError(
                f"{it.path}: entries refer to a parent, but there is no parent link", pid=pid, errno=errno.EINVAL
            )
    return chain


def load_parent(path: str, pid: int) -> Iteration:
    """The iteration at ``path`` (decoded, pages file checked) for use as a parent; the levels below it are
    only checked to exist with a pagemap of ``pid`` (decoding every level each iteration costs ~9 ms a level
    at 8 GiB: ``load_chain`` / ``wpdump verify -D`` check the whole chain)."""
    it = load_iteration(path, pid)
    check_pages_file(it)
    name = images.pagemap_file_name(pid)
    if _levels_hold(path, name):
        return it
    below = None  # something is amiss below: say what, as load_chain would
    for cur, err in walk_links(path, pid):
        if err is not None:
            raise err
        if below is not None and not os.path.isfile(os.path.join(cur, name)):
            raise ChainError(f"{cur} (parent of {below}) holds no {name}", pid=pid, errno=errno.ENOENT)
        below = cur
    return it


def _levels_hold(path: str, name: str) -> bool:
    """Whether every level from ``path`` down its parent links holds a file ``name``, in two system calls a level
    (stat of the file, readlink of the link: the walk by walk_links takes four): False at anything amiss (a
    missing level or file, a loop), which walk_links then describes."""
    seen: set[tuple[int, int]] = set()
    cur = os.path.normpath(path)
    while True:
        try:
            st = os.stat(os.path.join(cur, name))
        except OSError:
            return False
        # a level is known by its file: a loop revisits the same one (a pagemap hard-linked between levels reads
        # as a loop here, and walk_links then judges it by the directories)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in seen or len(seen) >= MAX_DEPTH:
            return False
        seen.add((st.st_dev, st.st_ino))
        try:
            link = os.readlink(os.path.join(cur, "parent"))
        except OSError as e:  # no link (ENOENT), or "parent" is not a symlink (EINVAL): the chain ends here
            return e.errno in (errno.ENOENT, errno.EINVAL)
        cur = os.path.normpath(os.path.join(cur, link))


@dataclass
class TreeParent:
    """The parent iteration of a tree: the root's image (``top``) and every process's, by vpid."""

    top: Iteration
    members: dict[int, Iteration]


def load_parent_tree(path: str, root: int, start_ticks: int, vpid: int) -> TreeParent:
    """The iteration at ``path`` as the parent of an iteration of the tree rooted at ``root`` (``vpid`` in its pid
    namespace), checked to be an image of that very process; each process's image decoded and its pages file
    checked."""
    top = load_parent(path, vpid)
    check_parent(top, root, start_ticks)
    members = {top.pid: top}
    for v in tree_vpids(path):
        if v != vpid:
            it = load_iteration(path, v)
            check_pages_file(it)
            members[v] = it
    return TreeParent(top, members)


def same_process(meta: dict, start_ticks: int, pid: int | None = None) -> bool:
    """Whether wpdump's metadata of an iteration names this very process: its start time on this boot (and
    ``pid`` when given). A pid alone may have been reused."""
    same = meta.get("start_ticks") == start_ticks and meta.get("boot_id") == boot_id()
    return same and (pid is None or meta.get("pid") == pid)


def check_parent(parent: Iteration, pid: int, start_ticks: int) -> None:
    """The parent must be an image of this very process (CRIU's pid-reuse check, plus our metadata)."""
    if parent.inventory is not None and parent.inventory.HasField("dump_uptime"):
        if start_time_us(start_ticks) > parent.inventory.dump_uptime:
            raise ChainError(
                f"{parent.path} was dumped before pid {pid} started: the pid was reused, it is another process",
                pid=pid, errno=errno.ESRCH,
            )
    if parent.meta is not None:
        if not same_process(parent.meta, start_ticks, pid):
            raise ChainError(
                f"{parent.path} is an image of another process (pid {parent.meta.get('pid')}, "
                f"started at tick {parent.meta.get('start_ticks')})", pid=pid, errno=errno.ESRCH,
            )


def locate_pages(chain: list[Iteration], addrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each page address (sorted), the chain level whose pages file holds it and the offset there.

    Level -1 means no level holds it (the page is zero). Pages are resolved top down, as CRIU does.
    """
    level = np.full(len(addrs), -1, dtype=np.int64)
    offset = np.zeros(len(addrs), dtype=np.uint64)
    pending = np.ones(len(addrs), dtype=bool)
    for i, it in enumerate(chain):
        if not pending.any():
            break
        idx = np.flatnonzero(pending)
        a = addrs[idx]
        listed = in_ranges(a, it.ranges())
        pending[idx[~listed]] = False  # absent at this level: zero (a level lists every non-zero page)
        offs = images.page_offsets(it.entries, a)
        ok = listed & (offs >= 0)
        level[idx[ok]] = i
        offset[idx[ok]] = offs[ok].astype(np.uint64)
        pending[idx[ok]] = False
    return level, offset


def file_runs(idx: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of consecutive indices whose file offsets are consecutive pages too.

    ``idx`` (ascending row indices) and ``offsets`` (their offsets in one pages file). Returns (first index, pages,
    first offset) of each run: one pread per run instead of one per page.
    """
    if not len(idx):
        z = np.zeros(0, dtype=np.int64)
        return z, z, np.zeros(0, dtype=np.uint64)
    idx = np.asarray(idx, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.uint64)
    brk = np.flatnonzero((np.diff(idx) != 1) | (np.diff(offsets) != np.uint64(PAGE))) + 1
    first = np.concatenate(([0], brk))
    counts = np.diff(np.concatenate((first, [len(idx)])))
    return idx[first], counts, offsets[first]


def read_pages_into(
    chain: list[Iteration], addrs: np.ndarray, out: np.ndarray, rows: np.ndarray | None = None,
    located: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Fill rows of ``out`` (a C-contiguous n×PAGE uint8 array) with each page of sorted ``addrs`` as the chain's
    top says: page ``addrs[i]`` goes to row ``rows[i]`` (ascending; default ``i``). Rows of pages no level holds
    are left untouched. One pread per run of pages consecutive both in ``rows`` and in a level's pages file.
    ``located`` is locate_pages' result if already known.

    Returns the level supplying each page (-1: none).
    """
    level, offset = located if located is not None else locate_pages(chain, addrs)
    rows = np.arange(len(addrs), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    flat = out.reshape(-1)
    for i, it in enumerate(chain):
        sel = np.flatnonzero(level == i)
        if not len(sel):
            continue
        firsts, counts, offs = file_runs(rows[sel], offset[sel])
        try:
            fd = os.open(it.pages_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise ChainError(f"{it.pages_path}: {e.strerror}", pid=it.pid, errno=e.errno) from None
        try:
            for k, n, off in zip(firsts.tolist(), counts.tolist(), offs.tolist(), strict=True):
                view = memoryview(flat[k * PAGE : (k + n) * PAGE])
                got = 0
                while got < n * PAGE:
                    r = os.preadv(fd, [view[got:]], off + got)
                    if r <= 0:
                        raise ChainError(
                            f"{it.pages_path}: truncated: no data at offset {off + got}, the pagemap lists more "
                            "present pages", pid=it.pid, errno=errno.EINVAL,
                        )
                    got += r
        except OSError as e:
            raise ChainError(f"{it.pages_path}: {e.strerror}", pid=it.pid, errno=e.errno) from None
        finally:
            os.close(fd)
    return level


def read_pages(chain: list[Iteration], addrs: np.ndarray) -> np.ndarray:
    """The content of each page address (sorted) as the chain's top says: len(addrs)×PAGE uint8 rows, zero for
    pages no level holds; one pread per run of consecutive pages."""
    out = np.zeros((len(addrs), PAGE), dtype=np.uint8)
    read_pages_into(chain, addrs, out)
    return out
