"""The final dump without CRIU's full memory copy in the frozen window: ``criu dump --lazy-pages`` leaves private
anonymous pages in its page pipes (``PE_LAZY`` entries, no copy) and then keeps the tree frozen while its page
server waits. We harvest the tracker's dirty set (everything written since the last pre-dump), read only those
pages from the frozen tree, and rewrite the pagemap: unchanged lazy pages become ``PE_PARENT`` (in the pre-dump
chain). Whenever the chain cannot be vouched for, every lazy page is read (a full final dump, still correct).

CRIU's own way to hand out lazy pages, ``PS_IOV_GET``, fails here (CRIU 4.1.1, Linux 6.18): its page_pipe_read
``tee()``s from the page pipe and gets EPERM, logs "page-pipe: tee: 65536: Operation not permitted" and drops the
connection; so the pages are read from the frozen tree, which CRIU leaves untouched meanwhile.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .. import ranges
from ..errors import MigrationError, WpdumpError
from ..images import format as images
from ..images.chain import load_chain, member_meta, read_image_file, read_meta, read_pages, same_process
from ..ranges import PAGE, page_addrs
from ..target.memory import Reader, aligned_buffer
from ..target.process import check_alive
from ..target.tree import read_tree
from ..tracking.session import KeeperSession
from . import pageserver as ps
from .serve import last_error

BATCH = 64 << 20  # bytes read from the frozen process at a time
SAMPLE_PAGES = 256  # PE_PARENT pages compared byte for byte between the frozen tree and the chain
@dataclass
class LazyResult:
    dump_s: float = 0.0  # criu's dump phase (start to page server up)
    page_server_at: float = 0.0  # time.time() when the dump phase was over
    harvest_s: float = 0.0
    fetch_s: float = 0.0  # reading the dirty pages, rewriting the pagemap
    finish_s: float = 0.0  # CRIU's end after its page server is closed
    pages_lazy: int = 0
    pages_fetched: int = 0
    pages_parent: int = 0
    note: str = ""


def _unchanged(root: int, top_want: str) -> tuple[dict[int, np.ndarray], list[str]]:
    """Per vpid, the pages unchanged since the chain's top ``top_want`` of every process of the tree wpdump tracked
    since (the tree is frozen), checked on a sample against the frozen tree; notes on what is read whole.
    Tracking ends."""
    st = check_alive(root)
    ks = KeeperSession.connect(root)
    if ks is None:
        return {}, [f"pid {root} is not tracked"]
    out: dict[int, tuple[np.ndarray, list, int]] = {}
    notes: list[str] = []
    with ks:
        status = ks.status()
        top_dir = status.get("images_dir") or ""
        if not top_dir or os.path.realpath(top_dir) != os.path.realpath(top_want):
            return {}, [f"the keeper's last iteration {top_dir!r} is not {top_want}"]
        meta = read_meta(top_dir) or {}
        root_meta = member_meta(meta, meta.get("vpid", root)) or {}
        if meta.get("iteration") != status.get("iteration") or not same_process(root_meta, st.start_ticks):
            return {}, [f"{top_dir} is not the iteration tracked since"]
        by_process = {(int(p["pid"]), int(p["start_ticks"])): int(v) for v, p in meta.get("processes", {}).items()}
        if "processes" not in meta:  # an iteration of one process (format 1)
            by_process = {(root, st.start_ticks): int(meta.get("pid", root))}
        for tr in ks.take().values():
            vpid = by_process.get((tr.pid, tr.start_ticks))
            if vpid is None:
                continue  # appeared after the last iteration: read whole
            try:
                chain = load_chain(top_dir, vpid)
                out[vpid] = (tr.harvest().unchanged(chain[0].ranges()), chain, tr.pid)
            except WpdumpError as e:
                notes.append(f"vpid {vpid}: {e}")
        ks.untrack()
    unchanged: dict[int, np.ndarray] = {}
    for vpid, (r, chain, host) in out.items():
        bad = _sample_differs(host, chain, r)
        if bad is None:
            unchanged[vpid] = r
        else:
            notes.append(f"vpid {vpid}: the chain's page {bad:#x} differs from the frozen tree")
    return unchanged, notes


def _sample_differs(pid: int, chain: list, unchanged: np.ndarray) -> int | None:
    """Compare a random sample of would-be PE_PARENT pages between the frozen tree and the chain (as the hook
    does with CRIU's pages); the address of the first that differs, else None."""
    if not len(unchanged):
        return None
    total = ranges.total(unchanged) // PAGE
    pick = np.sort(np.random.default_rng().choice(total, min(SAMPLE_PAGES, total), replace=False))
    addrs = page_addrs(unchanged)[pick]
    want = read_pages(chain, addrs)
    got = aligned_buffer(len(addrs) * PAGE)
    with Reader(pid) as reader:
        if reader.read_into(ranges.from_pages(addrs), got) is not None:
            return int(addrs[0])
    diff = np.flatnonzero((got.reshape(len(addrs), PAGE) != want).any(axis=1))
    return int(addrs[diff[0]]) if len(diff) else None


def _read_write(reader: Reader, r: np.ndarray, out_fd: int, buf: np.ndarray, what: str) -> None:
    """Read ranges ``r`` of the frozen process and append them to ``out_fd``; a page that cannot be read fails."""
    for batch in ranges.batches(r, len(buf)):
        n = ranges.total(batch)
        if reader.read_into(batch, buf) is not None:
            raise MigrationError(f"{what}: pages of the frozen process vanished", errno=errno.EIO)
        view = memoryview(buf[:n])
        while len(view):
            view = view[os.write(out_fd, view):]


def _rewrite(final: str, name: str, pid: int, parent_ok: np.ndarray, res: LazyResult) -> None:
    """Read what ``name`` needs from the frozen process ``pid`` and write its pagemap anew: CRIU's present pages +
    the lazy pages not in ``parent_ok`` as PE_PRESENT, lazy pages in ``parent_ok`` as PE_PARENT."""
    pages_id, entries = images.decode_pagemap(read_image_file(final, name), os.path.join(final, name))
    lazy = images.ranges_of(entries[(entries["flags"] & images.PE_PRESENT) == 0], images.PE_LAZY)
    present = images.ranges_of(entries, images.PE_PRESENT)
    parent = ranges.intersect(lazy, parent_ok) if len(parent_ok) else ranges.EMPTY
    fetch = ranges.subtract(lazy, parent)
    res.pages_lazy += ranges.total(lazy) // PAGE
    res.pages_fetched += ranges.total(fetch) // PAGE
    res.pages_parent += ranges.total(parent) // PAGE
    old_path = os.path.join(final, images.pages_file_name(pages_id))
    used = [int(n[6:-4]) for n in os.listdir(final) if n.startswith("pages-") and n[6:-4].isdigit()]
    new_id = max(used) + 1
    src = os.open(old_path, os.O_RDONLY | os.O_CLOEXEC)
    dst = os.open(os.path.join(final, images.pages_file_name(new_id)), os.O_WRONLY | os.O_CREAT | os.O_EXCL
                  | os.O_CLOEXEC, 0o600)
    buf = aligned_buffer(min(BATCH, max(PAGE, ranges.total(fetch))))
    try:
        with Reader(pid) as reader:
            offs = images.page_offsets(entries, present[:, 0]) if len(present) else np.zeros(0, np.int64)
            parts = [(s, e, int(o)) for (s, e), o in zip(present.tolist(), offs.tolist(), strict=True)]
            parts += [(s, e, -1) for s, e in fetch.tolist()]
            pending: list[tuple[int, int]] = []
            for s, e, off in [*sorted(parts), (0, 0, -2)]:
                if off != -1 and pending:  # the lazy pages read so far, in address order
                    _read_write(reader, ranges.from_pairs(pending), dst, buf, name)
                    pending = []
                if off == -1:
                    pending.append((s, e))
                n, pos = e - s, off
                while off >= 0 and n:
                    k = os.copy_file_range(src, dst, n, pos)
                    if k <= 0:
                        raise MigrationError(f"short copy from {old_path}", errno=errno.EIO)
                    n, pos = n - k, pos + k
            os.fsync(dst)
    finally:
        os.close(src)
        os.close(dst)
    data = images.encode_pagemap(new_id, images.entries_from_ranges(ranges.union(present, fetch), parent))
    tmp = os.path.join(final, f".{name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    os.rename(tmp, os.path.join(final, name))
    os.unlink(old_path)


def final_dump(criu: str, root: int, final: str, log_path: str, script: str, parent: str | None,
               started: Callable[[int], None] | None = None) -> LazyResult:
    """``criu dump --lazy-pages --leave-stopped`` of the tree at ``root`` into ``final`` (``script``: the action
    script, action.write without the rewrite), only the dirty lazy pages read; ``parent`` (the last pre-dump,
    relative to ``final``) becomes the ``parent`` link when pages stay there. CRIU exits after we close its page
    server; the tree is then left stopped. On an error CRIU is killed, which leaves the tree running
    (docs/kernel.md, CRIU and test hosts)."""
    res = LazyResult()
    # CRIU's page server on a socket pair (--ps-socket) rather than a TCP port: should we die, it reads EOF and
    # ends (leaving the tree stopped, for the guard to resume) instead of waiting for a connection with the tree
    # frozen. --status-fd tells when the dump phase is over and the page server serves.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    status_r, status_w = os.pipe()
    t0 = time.time()
    try:
        p = subprocess.Popen([criu, "dump", "-t", str(root), "-D", final, "-o", log_path, "-v4", "--leave-stopped",
                              "--lazy-pages", "--ps-socket", str(theirs.fileno()), "--status-fd", str(status_w),
                              "--action-script", script], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, pass_fds=(theirs.fileno(), status_w))
    finally:
        theirs.close()
        os.close(status_w)
    sk: socket.socket | None = ours
    try:
        if started is not None:
            started(p.pid)
        with open(status_r, "rb", buffering=0) as f:
            ready = f.read(1)
        if ready != b"\0":
            p.wait(timeout=600)
            raise MigrationError(f"criu dump --lazy-pages failed (exit {p.returncode}): {last_error(log_path)}",
                                 pid=root, errno=errno.EIO)
        res.page_server_at = time.time()
        res.dump_s = res.page_server_at - t0
        t1 = time.perf_counter()
        top = os.path.normpath(os.path.join(final, parent)) if parent else ""
        try:
            unchanged, notes = _unchanged(root, top) if parent else ({}, ["no pre-dump"])
        except WpdumpError as e:
            unchanged, notes = {}, [f"tracking lost ({e})"]
        res.harvest_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        hosts = {m.vpid: m.pid for m in read_tree(root)}
        for name in sorted(os.listdir(final)):
            dst_id = ps.dst_id_of(name)
            if dst_id is None:
                continue
            kind, ident = ps.decode_dst_id(dst_id)
            if kind != ps.PS_TYPE_PID:
                continue
            if ident not in hosts:
                raise MigrationError(f"{name}: no process of the tree has pid {ident} in its namespace",
                                     pid=root, errno=errno.ESRCH)
            if ident not in unchanged and not notes:
                notes.append(f"vpid {ident} not tracked since the last pre-dump")
            _rewrite(final, name, hosts[ident], unchanged.get(ident, ranges.EMPTY), res)
        res.note = "; ".join(notes)
        if res.pages_parent:
            if parent is None:
                raise MigrationError("PE_PARENT pages without a parent iteration", pid=root, errno=errno.EINVAL)
            os.symlink(parent, os.path.join(final, "parent"))
        res.fetch_s = time.perf_counter() - t2
        t3 = time.perf_counter()
        ps.close(sk)
        sk.close()
        sk = None
        if p.wait(timeout=600) != 0:
            raise MigrationError(f"criu dump --lazy-pages failed (exit {p.returncode}): {last_error(log_path)}",
                                 pid=root, errno=errno.EIO)
        res.finish_s = time.perf_counter() - t3
        return res
    except BaseException:
        if p.poll() is None:
            p.kill()
            p.wait()
        raise
    finally:
        if sk is not None:
            sk.close()
