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
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from .. import ranges
from ..errors import ChainError, WpdumpError
from ..images import format as images
from ..images import imgdir
from ..images.chain import load_chain, member_meta, read_image_file, read_meta, read_pages, same_process
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
    replaced: str = ""  # CRIU's pages file, no longer referred to once the directory is synced


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rewrite(
    images_dir: str, pid: int, top_dir: str, tracker: Tracker, chain: list | None = None, new_id: int | None = None,
    finish: bool = True,
) -> HookResult:
    """Turn CRIU's final images of process ``pid`` (its vpid, as CRIU names it) in ``images_dir`` into an
    increment on the chain at ``top_dir``, which the ``parent`` link of ``images_dir`` must lead to.

    ``tracker`` must have tracked the process since that iteration; the tree must be frozen. The kept pages go
    to ``pages-NEW_ID.img`` (default: one past the highest there). Without ``finish`` the caller fsyncs the
    directory and then removes CRIU's pages file (``HookResult.replaced``), once for many processes.
    """
    t0 = time.perf_counter()
    name = images.pagemap_file_name(pid)
    try:
        pages_id, entries = images.decode_pagemap(read_image_file(images_dir, name), os.path.join(images_dir, name))
    except (images.ImageError, ChainError) as e:
        raise HookSkipped(f"cannot read CRIU's {name}: {e}", pid=pid, errno=errno.EINVAL) from None
    if ((entries["flags"] & images.PE_PARENT) != 0).any():
        raise HookSkipped("CRIU's dump already refers to a parent", pid=pid, errno=errno.EEXIST)
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
        if new_id is None:
            new_id = max(_pages_ids(images_dir)) + 1
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
    if os.path.realpath(os.path.join(images_dir, "parent")) != os.path.realpath(top.path):
        os.unlink(new_pages)
        raise HookSkipped(f"{images_dir}/parent does not lead to {top.path}", pid=pid, errno=errno.EINVAL)
    committed = False
    try:
        fd = os.open(tmp_map, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            imgdir.write_all(fd, images.encode_pagemap(new_id, images.entries_from_ranges(present, parent)), tmp_map)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp_map, os.path.join(images_dir, name))  # the commit point
        committed = True
    finally:
        if not committed:  # CRIU's own pagemap and pages are still in place
            for p in (tmp_map, new_pages):
                if os.path.lexists(p):
                    os.unlink(p)
    res.replaced = pages_path
    if finish:
        _fsync_dir(images_dir)
        _remove_detached([pages_path])
    res.seconds = time.perf_counter() - t0
    return res


def _unlink_all(paths: list[str]) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            os.unlink(p)


def move_aside(paths: list[str]) -> list[str]:
    """Rename files to be removed to hidden names (no image reader lists them); returns the new paths."""
    trash = []
    for path in paths:
        t = os.path.join(os.path.dirname(path), f".wpdump-unlink-{os.path.basename(path)}".removesuffix(".img"))
        os.rename(path, t)
        trash.append(t)
    return trash


def _remove_detached(paths: list[str]) -> None:
    """Remove CRIU's pages files after its frozen window: each renamed aside now (microseconds), then unlinked by
    one process of its own that outlives the hook (CRIU waits for the hook alone). Unlinking them inside the
    window cost 1.3 s for 8 GiB here (ext4 frees every block), 50 ms for 1 GiB."""
    trash = move_aside(paths)
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


def post_dump(images_dir: str, root: int, out, chains: dict | None = None,
              after: contextlib.ExitStack | None = None) -> None:
    """The post-dump work: every process's pagemap rewritten (or left as CRIU wrote it), one line each
    (``chains``, ``after``: see hook_tree)."""
    try:
        results, skipped = hook_tree(images_dir, root, chains, after)
    except (WpdumpError, OSError) as e:
        print(f"wpdump criu-hook: pid {root}: left CRIU's full images as they are: {e}", file=out, flush=True)
        return
    for vpid, why in skipped:
        print(f"wpdump criu-hook: process {vpid}: left CRIU's full images as they are: {why}", file=out, flush=True)
    for res in results:
        print(
            f"wpdump criu-hook: process {res.pid}: {res.pages_parent} of {res.pages_criu} pages now in the parent "
            f"{res.parent}, {res.pages_present} kept ({res.bytes_after / 2**20:.1f} of "
            f"{res.bytes_before / 2**20:.1f} MiB) in {res.seconds * 1e3:.1f} ms", file=out, flush=True,
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


def hook_tree(
    images_dir: str, root: int, chains: dict[tuple[str, int], list] | None = None,
    after: contextlib.ExitStack | None = None,
) -> tuple[list[HookResult], list[tuple[int, str]]]:
    """Rewrite CRIU's pagemap of every process of the tree rooted at ``root`` that wpdump tracked since its last
    iteration; returns the results and the (vpid, why) of the processes left as CRIU wrote them. ``chains``:
    loaded before the freeze. ``after``: what can wait until CRIU's frozen window is over is left to it (closing
    the trackers, when the last close of a userfaultfd drops the write-protection of a whole tree; removing
    CRIU's replaced pages files)."""
    st = check_alive(root)
    ks = KeeperSession.connect(root)
    if ks is None:
        raise HookSkipped(f"pid {root} is not tracked by wpdump (no keeper)", pid=root, errno=errno.ENOENT)
    results: list[HookResult] = []
    skipped: list[tuple[int, str]] = []
    own = contextlib.ExitStack()
    (own if after is None else after).enter_context(ks)
    with own:
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
        link = os.path.join(images_dir, "parent")
        if os.path.lexists(link):
            raise HookSkipped(f"{images_dir} already has a parent link", pid=root, errno=errno.EEXIST)
        trackers = ks.take()
        by_process = {(int(p["pid"]), int(p["start_ticks"])): int(v) for v, p in meta.get("processes", {}).items()}
        if "processes" not in meta:  # an iteration of one process (format 1)
            by_process = {(root, st.start_ticks): int(meta.get("pid", root))}
        criu_vpids = set(_pagemap_vpids(images_dir))
        next_id = max(_pages_ids(images_dir), default=0) + 1
        os.symlink(os.path.relpath(top_dir, images_dir), link)  # before any PE_PARENT entry can appear
        try:
            for tr in trackers.values():
                vpid = by_process.get((tr.pid, tr.start_ticks))
                if vpid is None:
                    continue  # a process that appeared after the last iteration: CRIU's full pages stay
                if vpid not in criu_vpids:
                    skipped.append((vpid, f"CRIU's dump holds no {images.pagemap_file_name(vpid)}"))
                    continue
                criu_vpids.discard(vpid)
                try:
                    chain = (chains or {}).get((top_dir, vpid)) or load_chain(top_dir, vpid)
                    results.append(rewrite(images_dir, vpid, top_dir, tr, chain, next_id,
                                           finish=False))
                    next_id += 1
                except (HookSkipped, ChainError) as e:
                    skipped.append((vpid, str(e)))
        finally:
            if not results:
                os.unlink(link)
            _fsync_dir(images_dir)  # every new pagemap (and the link) durable before CRIU's pages files go
            if after is None:
                _remove_detached([r.replaced for r in results])
            else:
                after.callback(_unlink_all, move_aside([r.replaced for r in results]))
        skipped.extend((v, "not tracked by wpdump since its last iteration") for v in sorted(criu_vpids))
        # the final dump: tracking ends (the harvests above consumed the dirty sets). Not waited for: dropping the
        # write-protection of a big tree takes the keeper tens of ms a GiB, which CRIU's frozen window need not hold
        ks.untrack(wait=False)
    return results, skipped


def _pagemap_vpids(images_dir: str) -> list[int]:
    return [int(m.group(1)) for n in os.listdir(images_dir) if (m := re.fullmatch(r"pagemap-(\d+)\.img", n))]


def main() -> int:
    """``wpdump-criu-hook``: CRIU execs action scripts without a shell, so the hook is its own program."""
    return run_hook()
