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
from ..images.chain import META_FILE, load_chain, read_image_file, read_pages_into
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

    def as_dict(self) -> dict:
        return asdict(self)


def _other_files(top_path: str, pid: int, pages_id: int) -> list[str]:
    """Files of the top to copy as they are: inventory, stats and, in a CRIU dump, its other images."""
    skip = {images.pagemap_file_name(pid), images.pages_file_name(pages_id), "parent", META_FILE}
    names = []
    for name in sorted(os.listdir(top_path)):
        if name in skip:
            continue
        if re.fullmatch(r"pagemap-.*\.img|pages-\d+\.img", name):
            raise ChainError(
                f"{top_path} holds {name}: squash handles the pages of one process, not shared memory or several "
                "pagemaps", errno=errno.EINVAL,
            )
        if stat.S_ISREG(os.lstat(os.path.join(top_path, name)).st_mode):
            names.append(name)
    return names


def squash(path: str, out: str, batch_bytes: int = BATCH_BYTES) -> SquashResult:
    """Write ``out``: the pages of the chain's top ``path`` in one pages file, a pagemap listing them all
    PE_PRESENT, the top's inventory, stats-dump (and any other image files) copied, no parent link.

    ``out`` is written atomically (a temporary directory renamed into place) and must not exist or be empty.
    Its wpdump.json is the top's, marked as squashed: a later pre-dump may name it as its parent.
    """
    t0 = time.perf_counter()
    chain = load_chain(path)
    top = chain[0]
    listed = top.ranges()
    others = _other_files(top.path, top.pid, top.pages_id)
    pages_name = images.pages_file_name(top.pages_id)
    written = 0
    with imgdir.Staging(out) as st:
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
        for name in others:
            st.write_file(name, read_image_file(top.path, name))
        if top.meta is not None:
            meta = dict(top.meta)
            meta["parent_iteration"] = None
            meta["incremental"] = False
            meta["squashed"] = {"from": [it.path for it in chain], "created": time.time()}
            if isinstance(meta.get("result"), dict):
                meta["result"] = dict(meta["result"], images_dir=st.dest, parent=None)
            st.write_file(META_FILE, json.dumps(meta, indent=1).encode())
        dest = st.commit()
    return SquashResult(
        out=dest, top=top.path, pid=top.pid, levels=len(chain), pages=written, bytes=written * PAGE,
        seconds=time.perf_counter() - t0, copied=others,
    )
