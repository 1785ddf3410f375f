"""``wpdump squash``: a chain of iterations as one self-contained images directory equal to its top."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import ranges
from ..errors import ChainError
from ..images import format as images
from ..images import imgdir
from ..images.chain import (
    META_FILE,
    Iteration,
    load_chain,
    meta_json,
    read_image_file,
    read_meta,
    read_pages_into,
    tree_vpids,
)
from ..images.imgdir import walk_links
from ..ranges import PAGE, page_addrs

BATCH_BYTES = 64 << 20  # pages read from the chain and written per step


@dataclass
class SquashResult:
    out: str
    top: str
    pid: int
    levels: int  # iterations squashed
    pages: int  # pages written
    bytes: int
    seconds: float
    copied: list[str] = field(default_factory=list)  # the top's other files copied as they are
    processes: int = 1

    def as_dict(self) -> dict:
        return asdict(self)


def _other_files(top_path: str, rewritten: set[str]) -> list[str]:
    """Files of the top to copy as they are: inventory, stats, shared objects' images (stored whole, never in a
    parent) and, in a CRIU dump, its other images."""
    skip = rewritten | {"parent", META_FILE}
    shm_pages: set[str] = set()
    for name in os.listdir(top_path):
        if re.fullmatch(r"pagemap-shmem-\d+\.img", name):
            pages_id, _ = images.decode_pagemap(read_image_file(top_path, name), os.path.join(top_path, name))
            shm_pages.add(images.pages_file_name(pages_id))
    names = []
    for name in sorted(os.listdir(top_path)):
        if name in skip or name.startswith("."):  # hidden: no image (the hook's replaced files on their way out)
            continue
        shm = re.fullmatch(r"pagemap-shmem-\d+\.img", name) or name in shm_pages
        if not shm and re.fullmatch(r"pagemap-.*\.img|pages-\d+\.img", name):
            raise ChainError(f"{top_path} holds {name}, which belongs to no process of it: not squashing",
                             errno=errno.EINVAL)
        if stat.S_ISREG(os.lstat(os.path.join(top_path, name)).st_mode):
            names.append(name)
    return names


def _squash_process(st: imgdir.Staging, path: str, vpid: int | None, batch_bytes: int) -> tuple[Iteration, int, int]:
    """Write one process's pages of the chain's top as PE_PRESENT only; returns (its top, pages, levels)."""
    chain = load_chain(path, vpid)
    top = chain[0]
    listed = top.ranges()
    pages_name = images.pages_file_name(top.pages_id)
    written = 0
    fd = st.create(pages_name)
    try:
        buf = np.empty(0, dtype=np.uint8)
        for batch in ranges.batches(listed, batch_bytes):
            addrs = page_addrs(batch)
            n = len(addrs)
            if len(buf) < n * PAGE:
                buf = np.empty(n * PAGE, dtype=np.uint8)
            rows = buf[: n * PAGE].reshape(n, PAGE)
            level = read_pages_into(chain, addrs, rows)
            if (level < 0).any():  # load_chain has checked every in-parent page has a level: never here
                bad = int(addrs[np.flatnonzero(level < 0)[0]])
                raise ChainError(f"{path}: no level of the chain holds page {bad:#x}", errno=errno.EINVAL)
            try:
                imgdir.write_all(fd, rows.reshape(-1), os.path.join(st.dest, pages_name))
            except OSError as e:
                raise imgdir.describe_os_error(e, os.path.join(st.dest, pages_name)) from None
            written += n
        imgdir.fsync(fd, os.path.join(st.dest, pages_name))
    finally:
        os.close(fd)
    entries = images.entries_from_ranges(listed, ranges.EMPTY)
    st.write_file(images.pagemap_file_name(top.pid), images.encode_pagemap(top.pages_id, entries))
    return top, written, len(chain)


def squash(path: str, out: str, batch_bytes: int = BATCH_BYTES) -> SquashResult:
    """Write ``out``: for every process of the chain's top ``path``, its pages in one pages file and a pagemap
    listing them all PE_PRESENT; the top's inventory, stats-dump, shared objects (and any other image files)
    copied; no parent link.

    ``out`` is written atomically (a temporary directory renamed into place) and must not exist or be empty.
    Its wpdump.json is the top's, marked as squashed: a later pre-dump may name it as its parent.
    """
    t0 = time.perf_counter()
    vpids: list[int | None] = list(tree_vpids(path)) if os.path.isdir(path) else []
    if len(vpids) <= 1:
        vpids = [None]  # one process: named by load_chain (errors too)
    written = levels = 0
    tops: list[Iteration] = []
    with imgdir.Staging(out) as st:
        for v in vpids:
            top, n, depth = _squash_process(st, path, v, batch_bytes)
            tops.append(top)
            written, levels = written + n, max(levels, depth)
        rewritten = {n for t in tops for n in (images.pagemap_file_name(t.pid), images.pages_file_name(t.pages_id))}
        others = _other_files(tops[0].path, rewritten)
        for name in others:
            st.write_file(name, read_image_file(tops[0].path, name))
        meta = read_meta(tops[0].path)
        if meta is not None:
            meta = dict(meta)
            meta["parent_iteration"] = None
            meta["incremental"] = False
            meta["squashed"] = {"from": [d for d, _ in walk_links(path)], "created": time.time()}
            if isinstance(meta.get("result"), dict):
                meta["result"] = dict(meta["result"], images_dir=st.dest, parent=None)
            st.write_file(META_FILE, meta_json(meta) if "processes" in meta else json.dumps(meta, indent=1).encode())
        dest = st.commit()
    top = tops[0]
    return SquashResult(
        out=dest, top=top.path, pid=top.pid, levels=levels, pages=written, bytes=written * PAGE,
        seconds=time.perf_counter() - t0, copied=others, processes=len(tops),
    )
