"""userfaultfd and PAGEMAP_SCAN over the native helper: constants and wrappers that raise typed errors (from_errno:
the errno and, where the caller names it, the pid); no -errno value reaches the callers."""

from __future__ import annotations

import errno
import os

import numpy as np

from ..errors import KernelUnsupported, TrackerError, WpdumpError, from_errno
from ..ranges import PAGE
from .native import check, ffi, lib

# userfaultfd (linux/userfaultfd.h; WP_UNPOPULATED and WP_ASYNC are newer than Debian 12's headers)
UFFD_USER_MODE_ONLY = 1
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFDIO_REGISTER_MODE_WP = 1 << 1
FEATURE_NAMES = {
    UFFD_FEATURE_WP_ASYNC: "UFFD_FEATURE_WP_ASYNC",
    UFFD_FEATURE_WP_UNPOPULATED: "UFFD_FEATURE_WP_UNPOPULATED",
    UFFD_FEATURE_WP_HUGETLBFS_SHMEM: "UFFD_FEATURE_WP_HUGETLBFS_SHMEM",
}
TRACK_FEATURES = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM

# PAGEMAP_SCAN (linux/fs.h, Linux 6.7)
PM_SCAN_WP_MATCHING = 1
PM_SCAN_CHECK_WPASYNC = 2
PAGE_IS_WPALLOWED = 1
PAGE_IS_WRITTEN = 2
PAGE_IS_FILE = 4
PAGE_IS_PRESENT = 8
PAGE_IS_SWAPPED = 16
PAGE_IS_PFNZERO = 32
PAGE_IS_HUGE = 64
PAGE_IS_SOFT_DIRTY = 128
PAGE_IS_GUARD = 256
CLASSIFY_MASK = (
    PAGE_IS_WRITTEN | PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO | PAGE_IS_FILE | PAGE_IS_HUGE
    | PAGE_IS_GUARD
)
# PAGE_IS_FILE costs the kernel a struct page lookup per PTE of the whole range (not only the written
# ones): 10 ms per GiB scanned against 1.1 ms without it (docs/kernel.md, costs). Only private file
# mappings need it; in anonymous and shared VMAs classification does not look at it.
CLASSIFY_MASK_NO_FILE = CLASSIFY_MASK & ~PAGE_IS_FILE


def classify_mask(file_private: bool) -> int:
    """The return_mask to classify written pages of a VMA: with PAGE_IS_FILE only for private file mappings."""
    return CLASSIFY_MASK if file_private else CLASSIFY_MASK_NO_FILE

REGION_DTYPE = np.dtype([("start", "<u8"), ("end", "<u8"), ("categories", "<u8")])


def create_local(flags: int = UFFD_USER_MODE_ONLY | os.O_CLOEXEC) -> int:
    """A userfaultfd of this process (used to probe the kernel's features)."""
    fd = lib.wpd_userfaultfd(flags)
    if fd < 0:
        if fd == -errno.ENOSYS:
            raise KernelUnsupported("userfaultfd", errno=-fd)
        raise TrackerError(f"userfaultfd: {os.strerror(-fd)}", errno=-fd)
    return fd


def probe_features() -> int:
    """Features this kernel's UFFDIO_API offers."""
    fd = create_local()
    try:
        feats, ioctls = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        r = lib.wpd_uffd_api(fd, 0, feats, ioctls)
        if r < 0:
            raise TrackerError(f"UFFDIO_API: {os.strerror(-r)}", errno=-r)
        return int(feats[0])
    finally:
        os.close(fd)


def missing_features(wanted: int = TRACK_FEATURES) -> list[str]:
    """Names of the wanted uffd features the kernel lacks (empty when all are there)."""
    have = probe_features()
    return [name for bit, name in FEATURE_NAMES.items() if wanted & bit and not have & bit]


def api(fd: int, pid: int, features: int = TRACK_FEATURES) -> int:
    """UFFDIO_API handshake asking for ``features``; names the missing feature when refused."""
    feats, ioctls = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    r = lib.wpd_uffd_api(fd, features, feats, ioctls)
    if r == -errno.EINVAL:
        missing = missing_features(features)
        raise KernelUnsupported(missing[0] if missing else "UFFDIO_API", pid=pid, errno=-r)
    if r < 0:
        raise from_errno(r, pid, "UFFDIO_API")
    return int(feats[0])


def register_wp(fd: int, start: int, end: int, pid: int | None = None) -> None:
    """UFFDIO_REGISTER in WP mode (the caller decides what an error's EBUSY/EINVAL mean)."""
    ioctls = ffi.new("uint64_t *")
    check(lib.wpd_uffd_register(fd, start, end - start, UFFDIO_REGISTER_MODE_WP, ioctls), pid, "UFFDIO_REGISTER")


def writeprotect(fd: int, start: int, end: int, protect: bool = True, pid: int | None = None) -> None:
    """UFFDIO_WRITEPROTECT."""
    check(lib.wpd_uffd_writeprotect(fd, start, end - start, 1 if protect else 0), pid, "UFFDIO_WRITEPROTECT")


class RegionBuffer:
    """A reusable buffer of ``struct page_region`` viewed as a numpy structured array."""

    def __init__(self, capacity: int = 1 << 16) -> None:
        self.capacity = capacity
        self.array = np.empty(capacity, dtype=REGION_DTYPE)  # only the regions the kernel reports are read
        self.cdata = ffi.cast("struct wpd_region *", self.array.ctypes.data)
        self.walk_end = ffi.new("uint64_t *")


def scan(
    pagemap_fd: int,
    start: int,
    end: int,
    buf: RegionBuffer,
    *,
    flags: int = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
    category_mask: int = PAGE_IS_WRITTEN,
    category_anyof_mask: int = 0,
    category_inverted: int = 0,
    return_mask: int = CLASSIFY_MASK,
    pid: int | None = None,
) -> tuple[int, int]:
    """One PAGEMAP_SCAN pass over [start, end) into ``buf``: returns (count, walk_end).

    walk_end < end means the buffer filled up: consume the regions and call again from walk_end.
    """
    n = lib.wpd_pagemap_scan(
        pagemap_fd, start, end, flags, category_mask, category_inverted, category_anyof_mask,
        return_mask, 0, buf.cdata, buf.capacity, buf.walk_end,
    )
    return check(int(n), pid, "PAGEMAP_SCAN"), int(buf.walk_end[0])


def scan_all(pagemap_fd: int, start: int, end: int, buf: RegionBuffer, **kw: int) -> np.ndarray:
    """Scan [start, end) completely: a copy of all regions (``pid`` in ``kw`` names the target in errors)."""
    parts = []
    while start < end:
        n, walk_end = scan(pagemap_fd, start, end, buf, **kw)
        parts.append(buf.array[:n].copy())
        if walk_end <= start:
            break
        start = walk_end
    if not parts:
        return np.zeros(0, dtype=REGION_DTYPE)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def scan_ranges(
    pagemap_fd: int,
    spans: np.ndarray,
    return_masks: np.ndarray,
    buf: RegionBuffer,
    *,
    flags: int = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
    category_mask: int = PAGE_IS_WRITTEN,
    category_anyof_mask: int = 0,
    category_inverted: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scan each [start, end) of ``spans`` (n×2) with its own call (docs/kernel.md rule 4) and return mask,
    in one native loop: (all regions in range order, per range its number of regions, per range the errno
    that failed it or 0). Whether a range's failure is an error (EPERM: unregistered) is the caller's call.

    A range that failed contributes no regions (the scan may have re-protected some: rule 4).
    """
    spans = np.ascontiguousarray(spans, dtype=np.uint64).reshape(-1, 2)
    masks = np.ascontiguousarray(return_masks, dtype=np.uint64)
    n = len(spans)
    counts = np.zeros(n, dtype=np.int64)
    parts: list[np.ndarray] = []
    i = 0
    while i < n:
        k = int(lib.wpd_pagemap_scan_ranges(
            pagemap_fd, ffi.cast("const uint64_t *", spans[i:].ctypes.data),
            ffi.cast("const uint64_t *", masks[i:].ctypes.data), n - i, flags, category_mask,
            category_inverted, category_anyof_mask, buf.cdata, buf.capacity,
            ffi.cast("int64_t *", counts[i:].ctypes.data), buf.walk_end,
        ))
        done = counts[i : i + k]
        used = int(done[done > 0].sum())
        parts.append(buf.array[:used].copy())
        last = i + k - 1
        walk_end, end = int(buf.walk_end[0]), int(spans[last, 1])
        if counts[last] >= 0 and walk_end < end:  # the buffer filled up: finish that range alone
            try:
                rest = scan_all(
                    pagemap_fd, walk_end, end, buf, flags=flags, category_mask=category_mask,
                    category_anyof_mask=category_anyof_mask, category_inverted=category_inverted,
                    return_mask=int(masks[last]),
                )
            except WpdumpError as e:
                parts[-1] = parts[-1][: used - int(counts[last])]
                counts[last] = -(e.errno or errno.EIO)
            else:
                parts.append(rest)
                counts[last] += len(rest)
        i += k
    regions = np.concatenate(parts) if len(parts) > 1 else parts[0] if parts else np.zeros(0, dtype=REGION_DTYPE)
    errs = np.where(counts < 0, -counts, 0).astype(np.int32)  # the native loop's -errno stops here
    return regions, np.maximum(counts, 0), errs


def read_ranges(
    pid: int, ranges: np.ndarray, out: memoryview | bytearray | np.ndarray, dst: np.ndarray | None = None
) -> int:
    """Copy the target's [start, end) ``ranges`` (n×2 uint64) into ``out`` with process_vm_readv: back to back,
    or range i at byte ``dst[i]`` of ``out``.

    Returns the bytes copied (short at the first range that cannot be read); raises when nothing could be.
    It pins the pages: never for pages shared copy-on-write (docs/kernel.md rule 18; memory.Reader decides).
    """
    ranges = np.ascontiguousarray(ranges, dtype=np.uint64)
    src = ffi.cast("const uint64_t *", ranges.ctypes.data)
    out_p = ffi.from_buffer(out, require_writable=True)
    got = int(lib.wpd_read_ranges(pid, src, len(ranges), out_p, len(out_p), _dst(dst, len(ranges))))
    return check(got, pid, "process_vm_readv")


def pread_ranges(
    fd: int, ranges: np.ndarray, out: memoryview | bytearray | np.ndarray, dst: np.ndarray | None = None,
    pid: int | None = None, what: str = "pread",
) -> int:
    """pread the byte ranges [start, end) (n×2 uint64) of ``fd`` into ``out``, back to back or range i at byte
    ``dst[i]``: one pread per range. Returns the bytes read (short at the first range that fails or ends early;
    0 at end of file); raises when nothing could be read."""
    ranges = np.ascontiguousarray(ranges, dtype=np.uint64)
    src = ffi.cast("const uint64_t *", ranges.ctypes.data)
    out_p = ffi.from_buffer(out, require_writable=True)
    got = int(lib.wpd_preadv2_ranges(fd, src, len(ranges), out_p, len(out_p), _dst(dst, len(ranges)), 0))
    return check(got, pid, what)


RWF_NOWAIT = 0x8


def pread_cached(fd: int, ranges: np.ndarray, out: memoryview | bytearray | np.ndarray, what: str = "pread") -> int:
    """pread_ranges of only what the page cache holds (preadv2 RWF_NOWAIT): the bytes read back to back before the
    first range not read whole (a page not cached); raises on other errors. A filesystem that cannot tell is read
    as pread_ranges does."""
    ranges = np.ascontiguousarray(ranges, dtype=np.uint64)
    src = ffi.cast("const uint64_t *", ranges.ctypes.data)
    out_p = ffi.from_buffer(out, require_writable=True)
    got = int(lib.wpd_preadv2_ranges(fd, src, len(ranges), out_p, len(out_p), ffi.NULL, RWF_NOWAIT))
    if got in (-errno.EOPNOTSUPP, -errno.EINVAL):
        return pread_ranges(fd, ranges, out, what=what)
    return 0 if got == -errno.EAGAIN else check(got, None, what)


def _dst(dst: np.ndarray | None, n: int):
    if dst is None:
        return ffi.NULL
    if dst.dtype != np.uint64 or not dst.flags.c_contiguous or len(dst) < n:
        raise ValueError("dst: a contiguous uint64 array with one offset per range")
    return ffi.cast("const uint64_t *", dst.ctypes.data)


def pagemap_match(fd: int, r: np.ndarray, gap: int, all_of: int, any_of: int) -> np.ndarray | None:
    """Test the /proc/PID/pagemap entries (``fd``) of the pages of ``r`` (sorted, disjoint, page-aligned ranges)
    in one native call: a bool per page, in page order, True where the entry has every bit of ``all_of`` and one
    of ``any_of``; ranges less than ``gap`` bytes apart read by one pread. None when pagemap cannot be read (the
    mm is gone)."""
    r = np.ascontiguousarray(r, dtype=np.uint64)
    out = np.empty(int((r[:, 1] - r[:, 0]).sum()) // PAGE, dtype=np.uint8)
    got = lib.wpd_pagemap_match(fd, ffi.from_buffer("uint64_t[]", r), len(r), PAGE, gap, all_of, any_of,
                                ffi.from_buffer("uint8_t[]", out, require_writable=True))
    return None if got < 0 else out.view(bool)


def zero_pages(rows: np.ndarray) -> tuple[np.ndarray, int]:
    """Which rows of a C-contiguous n×PAGE uint8 array hold only zero bytes: (bool mask, count)."""
    n = len(rows)
    mask = np.zeros(n, dtype=np.uint8)
    if not n:
        return mask.view(bool), 0
    assert rows.flags.c_contiguous and rows.shape[1:] == (PAGE,)
    src = ffi.cast("const void *", rows.ctypes.data)
    count = int(lib.wpd_zero_pages(src, n, PAGE, ffi.cast("uint8_t *", mask.ctypes.data)))
    return mask.view(bool), count

