"""``wpdump criu-hook``: CRIU's action script for ``criu dump`` of a process wpdump tracks.

At ``pre-dump`` (before CRIU freezes the tree) it removes the tracker's write-protect markers from empty
pages: CRIU would read each as a swapped page and dump it (docs/kernel.md rule 17). At ``post-dump``
(the tree still frozen) it harvests the tracker's final dirty set and rewrites CRIU's final
``pagemap-PID.img``/``pages-N.img`` so that pages unchanged since wpdump's last pre-dump become
``PE_PARENT`` entries pointing into the wpdump chain (``parent`` link added): the final directory then
holds, for memory, only what changed since.

It fails safe: whenever it cannot vouch for the result (no tracker, tracking lost, chain broken,
CRIU's pages disagree with the chain) it leaves CRIU's full images untouched, says why, exits 0.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from .. import ranges
from ..errors import ChainError, WpdumpError
from ..images import format as images
from ..images import imgdir
from ..images.chain import load_chain, read_image_file, read_pages, same_process
from ..ranges import PAGE, page_addrs
from ..target.process import check_alive
from ..tracking.session import KeeperSession
from ..tracking.tracker import Tracker

log = logging.getLogger("wpdump.criu_hook")

SAMPLE_PAGES = 256  # PE_PARENT pages compared byte for byte between CRIU's dump and the chain


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


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rewrite(images_dir: str, pid: int, top_dir: str, tracker: Tracker, chain: list | None = None) -> HookResult:
    """Turn CRIU's final images of ``pid`` in ``images_dir`` into an increment on the chain at ``top_dir``.

    ``tracker`` must have tracked ``pid`` since that iteration; the target must be frozen.
    """
    t0 = time.perf_counter()
    name = images.pagemap_file_name(pid)
    try:
        pages_id, entries = images.decode_pagemap(read_image_file(images_dir, name), os.path.join(images_dir, name))
    except (images.ImageError, ChainError) as e:
        raise HookSkipped(f"cannot read CRIU's {name}: {e}", pid=pid, errno=errno.EINVAL) from None
    if ((entries["flags"] & images.PE_PARENT) != 0).any():
        raise HookSkipped("CRIU's dump already refers to a parent", pid=pid, errno=errno.EEXIST)
    if os.path.lexists(os.path.join(images_dir, "parent")):
        raise HookSkipped(f"{images_dir} already has a parent link", pid=pid, errno=errno.EEXIST)
    chain = chain or load_chain(top_dir, pid)
    top = chain[0]
    pages_path = os.path.join(images_dir, images.pages_file_name(pages_id))
    criu = images.ranges_of(entries)
    if os.path.getsize(pages_path) != ranges.total(criu):
        raise HookSkipped(f"{pages_path} does not match CRIU's pagemap", pid=pid, errno=errno.EINVAL)

    h = tracker.harvest()  # everything written since the chain's top (the tree is frozen by CRIU)
    unchanged = h.unchanged(top.ranges())
    parent = ranges.intersect(criu, unchanged)
    present = ranges.subtract(criu, parent)
    res = HookResult(pid, top.path, pages_criu=ranges.total(criu) // PAGE, pages_present=ranges.total(present) // PAGE,
                     pages_parent=ranges.total(parent) // PAGE, bytes_before=ranges.total(criu),
                     bytes_after=ranges.total(present))

    src = os.open(pages_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        _check_sample(src, entries, chain, parent, pid)
        used = [int(m.group(1)) for n in os.listdir(images_dir) if (m := re.fullmatch(r"pages-(\d+)\.img", n))]
        new_id = max(used) + 1
        new_pages = os.path.join(images_dir, images.pages_file_name(new_id))
        tmp_map = os.path.join(images_dir, f".{name}.wpdump-tmp")
        dst = os.open(new_pages, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            offs = images.page_offsets(entries, present[:, 0]) if len(present) else np.zeros(0, np.int64)
            for (s, e), off in zip(present.tolist(), offs.tolist(), strict=True):
                n, pos = e - s, off
                while n:
                    k = os.copy_file_range(src, dst, n, pos)
                    if k <= 0:
                        raise OSError(errno.EIO, f"short copy from {pages_path}")
                    n, pos = n - k, pos + k
            os.fsync(dst)
        except BaseException:
            os.close(dst)
            os.unlink(new_pages)
            raise
        os.close(dst)
    finally:
        os.close(src)
    parent_link = os.path.join(images_dir, "parent")
    linked = committed = False
    try:
        fd = os.open(tmp_map, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            imgdir.write_all(fd, images.encode_pagemap(new_id, images.entries_from_ranges(present, parent)), tmp_map)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.symlink(os.path.relpath(top.path, os.path.realpath(images_dir)), parent_link)
        linked = True
        os.rename(tmp_map, os.path.join(images_dir, name))  # the commit point
        committed = True
    finally:
        if not committed:  # CRIU's own pagemap and pages are still in place and need no parent
            for p in (tmp_map, new_pages):
                if os.path.lexists(p):
                    os.unlink(p)
            if linked:
                os.unlink(parent_link)
    _fsync_dir(images_dir)
    os.unlink(pages_path)
    res.seconds = time.perf_counter() - t0
    return res


def _check_sample(src: int, entries: np.ndarray, chain: list, parent: np.ndarray, pid: int) -> None:
    """Compare a random sample of would-be PE_PARENT pages between CRIU's dump and the chain."""
    if not len(parent):
        return
    counts = ((parent[:, 1] - parent[:, 0]) // PAGE).astype(np.int64)
    total = int(counts.sum())
    rng = random.Random(pid ^ int(time.time()))
    pick = sorted(rng.sample(range(total), min(SAMPLE_PAGES, total)))
    addrs = page_addrs(parent)[pick]
    want = read_pages(chain, addrs)
    offs = images.page_offsets(entries, addrs)
    for i, (a, off) in enumerate(zip(addrs.tolist(), offs.tolist(), strict=True)):
        got = os.pread(src, PAGE, off)
        if got != want[i].tobytes():
            raise HookSkipped(
                f"the chain's page {a:#x} differs from CRIU's dump: not vouching for it", pid=pid, errno=errno.EINVAL
            )


def run_hook(env: dict[str, str] | None = None, out=sys.stderr) -> int:
    """The action-script entry point: acts on ``pre-dump`` and ``post-dump``; always returns 0 (CRIU's
    dump must complete: at worst it stays a full dump)."""
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
        return _pre_dump(root, out)
    try:
        res = _hook_pid(images_dir, root)
    except (WpdumpError, OSError) as e:
        print(f"wpdump criu-hook: pid {root}: left CRIU's full images as they are: {e}", file=out, flush=True)
        return 0
    print(
        f"wpdump criu-hook: pid {root}: {res.pages_parent} of {res.pages_criu} pages now in the parent "
        f"{res.parent}, {res.pages_present} kept ({res.bytes_after / 2**20:.1f} of {res.bytes_before / 2**20:.1f} "
        f"MiB) in {res.seconds * 1e3:.1f} ms", file=out, flush=True,
    )
    return 0


def _pre_dump(pid: int, out) -> int:
    """Before CRIU freezes and reads the tree: no write-protect marker may remain on an empty page."""
    t0 = time.perf_counter()
    try:
        n = unmark(pid)
    except (WpdumpError, OSError) as e:
        # Past the checkout the keeper sees it end without a checkin and ends tracking: closing the
        # userfaultfd drops every marker (docs/kernel.md rule 10); post-dump then keeps CRIU's full images.
        print(f"wpdump criu-hook: pid {pid}: markers not removed (CRIU reads them as swapped pages): {e}",
              file=out, flush=True)
        return 0
    if n is not None:
        print(f"wpdump criu-hook: pid {pid}: removed write-protect markers from {n / 2**20:.1f} MiB of empty pages "
              f"in {(time.perf_counter() - t0) * 1e3:.1f} ms", file=out, flush=True)
    return 0


def unmark(pid: int) -> int | None:
    """Remove the tracker's markers from the empty pages of ``pid`` (bytes), tracking going on; None if
    ``pid`` is not tracked. On an error the tracker is not checked back in: tracking ends."""
    ks = KeeperSession.connect(pid)
    if ks is None:
        return None
    with ks:
        tr = ks.take()
        images_dir = ks.status().get("images_dir") or ""
        n = tr.unmark_empty()
        state, iteration = ks.checked_out
        ks.checkin(state, iteration, images_dir)  # the dirty set is unconsumed: the state is unchanged
        return n


def _hook_pid(images_dir: str, pid: int) -> HookResult:
    st = check_alive(pid)
    ks = KeeperSession.connect(pid)
    if ks is None:
        raise HookSkipped(f"pid {pid} is not tracked by wpdump (no keeper)", pid=pid, errno=errno.ENOENT)
    with ks:
        status = ks.status()
        top_dir = status.get("images_dir") or ""
        if not top_dir or not os.path.isdir(top_dir):
            raise HookSkipped(f"the last wpdump iteration {top_dir!r} is gone", pid=pid, errno=errno.ENOENT)
        chain = load_chain(top_dir, pid)
        meta = chain[0].meta or {}
        if meta.get("iteration") != status.get("iteration"):
            raise HookSkipped(f"{top_dir} is not the iteration tracked since", pid=pid, errno=errno.ESTALE)
        if not same_process(meta, st.start_ticks):
            raise HookSkipped(f"{top_dir} is an image of another process", pid=pid, errno=errno.ESRCH)
        res = rewrite(images_dir, pid, top_dir, ks.take(), chain)
        ks.untrack()  # the final dump: tracking ends (the harvest above consumed the dirty set)
        return res


def main() -> int:
    """``wpdump-criu-hook``: CRIU execs action scripts without a shell, so the hook is its own program."""
    return run_hook()
