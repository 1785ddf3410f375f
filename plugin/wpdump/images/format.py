"""CRIU image files: pagemap-PID.img, inventory.img, stats-dump (format of CRIU's criu/image.c, images/*.proto).

An image file is a head magic (IMG_COMMON_MAGIC, or IMG_SERVICE_MAGIC for service files such as stats; the
inventory has none), the image's own magic, then protobuf messages each preceded by its length as a
little-endian u32. The pagemap holds one ``pagemap_head`` then one ``pagemap_entry`` per run of pages.

Pagemap entries are numpy arrays of ENTRY_DTYPE. The pagemap codec runs one native pass over the entries
(wpd_pagemap_encode / wpd_pagemap_decode: 377,000 entries in a few ms where numpy took 33 and 46 ms); a layout
the native decoder does not take goes to a numpy parse, then to the protobuf classes; ``encode_pagemap_pb`` /
``decode_pagemap_pb`` are the slow reference using the protobuf classes
that protoc generates from proto/*.proto into ``wpdump.criu_pb`` at build time.
"""

from __future__ import annotations

import errno
import struct

import numpy as np
from google.protobuf.message import DecodeError, EncodeError

from ..criu_pb import inventory_pb2, pagemap_pb2, stats_pb2
from ..errors import WpdumpError
from ..ranges import PAGE
from ..target.native import ffi, lib

__all__ = [
    "ENTRY_DTYPE", "IMG_COMMON_MAGIC", "IMG_SERVICE_MAGIC", "INVENTORY_FILE", "INVENTORY_MAGIC", "PAGE",
    "PAGEMAP_MAGIC", "PE_LAZY", "PE_PARENT", "PE_PRESENT", "PRE_DUMP_READ", "PRE_DUMP_SPLICE", "STATS_FILE",
    "STATS_MAGIC", "CRTOOLS_IMAGES_V1_1", "ImageError", "decode_inventory", "decode_pagemap",
    "decode_pagemap_pb", "decode_stats", "encode_inventory", "encode_pagemap", "encode_pagemap_pb",
    "encode_stats", "entries_from_ranges", "pagemap_file_name", "pages_file_name", "ranges_of",
]

# criu/include/pagemap.h
PE_PARENT, PE_LAZY, PE_PRESENT = 1, 2, 4
PE_KNOWN = PE_PARENT | PE_LAZY | PE_PRESENT

# criu/include/magic.h
IMG_COMMON_MAGIC = 0x54564319  # Sarov
IMG_SERVICE_MAGIC = 0x55105940  # Zlatoust
PAGEMAP_MAGIC = 0x56084025  # Vladimir
INVENTORY_MAGIC = 0x58313116  # Veliky Novgorod
STATS_MAGIC = 0x57093306  # Ostashkov
CRTOOLS_IMAGES_V1_1 = 2  # images with the common magic at their head

# criu/include/cr_options.h: pre-dump variants, stored in the pre-dump's inventory
PRE_DUMP_SPLICE, PRE_DUMP_READ = 1, 2

ENTRY_DTYPE = np.dtype([("vaddr", "<u8"), ("nr_pages", "<u8"), ("flags", "<u4")])

INVENTORY_FILE = "inventory.img"
STATS_FILE = "stats-dump"

# criu/include/magic.h: every image magic, by name (wpdump writes and decodes the first five)
MAGICS = {
    IMG_COMMON_MAGIC: "IMG_COMMON", IMG_SERVICE_MAGIC: "IMG_SERVICE", PAGEMAP_MAGIC: "PAGEMAP",
    INVENTORY_MAGIC: "INVENTORY", STATS_MAGIC: "STATS",
    0x50273030: "PSTREE", 0x56213732: "FDINFO", 0x55053847: "CORE", 0x54432030: "IDS", 0x54123737: "VMAS",
    0x56513555: "PIPES", 0x56453709: "PIPES_DATA", 0x58364939: "FIFO", 0x59333054: "FIFO_DATA",
    0x55344201: "SIGACT", 0x54373943: "UNIXSK", 0x56443851: "INETSK", 0x60454618: "PACKETSK", 0x57464056: "ITIMERS",
    0x52603957: "POSIX_TIMERS", 0x56264026: "SK_QUEUES", 0x54473203: "UTSNS", 0x54023547: "CREDS",
    0x53115007: "IPC_VAR", 0x46283044: "IPCNS_SHM", 0x55453737: "IPCNS_MSG", 0x59573019: "IPCNS_SEM",
    0x50363636: "REG_FILES", 0x59255641: "EXT_FILES", 0x51403912: "FS", 0x57492820: "MM", 0x59133954: "REMAP_FPATH",
    0x52583605: "GHOST_FILE", 0x51465506: "TCP_STREAM", 0x44523722: "EVENTFD_FILE", 0x45023858: "EVENTPOLL_FILE",
    0x44433746: "EVENTPOLL_TFD", 0x57323820: "SIGNALFD", 0x48424431: "INOTIFY_FILE", 0x54562009: "INOTIFY_WD",
    0x55563928: "MNTS", 0x57373951: "NETDEV", 0x55933752: "NETNS", 0x59433025: "TTY_FILES", 0x59453036: "TTY_INFO",
    0x59413026: "TTY_DATA", 0x54323616: "FILE_LOCKS", 0x57113925: "RLIMIT", 0x55096122: "FANOTIFY_FILE",
    0x56506035: "FANOTIFY_MARK", 0x59255647: "SIGNAL", 0x58005614: "NETLINK_SK", 0x61394011: "NS_FILES",
    0x57143751: "TUNFILE", 0x59383330: "CGROUP", 0x50493712: "TIMERFD", 0x61404013: "CPUINFO", 0x55474906: "USERNS",
    0x64413049: "SECCOMP", 0x67343323: "BINFMT_MISC", 0x49353943: "AUTOFS", 0x56303138: "FILES",
    0x48453499: "MEMFD_INODE", 0x43114433: "TIMENS", 0x61157326: "PIDNS", 0x57506142: "BPFMAP_FILE",
    0x64324033: "BPFMAP_DATA", 0x59423047: "APPARMOR", 0x57004059: "IRMAP_CACHE", 0x57023458: "KDAT",
}
_U32 = struct.Struct("<I")
_U64_MAX = (1 << 64) - 1
_MAX_END = (1 << 64) - PAGE  # last page-aligned end that fits in a u64


class ImageError(WpdumpError):
    """A corrupt, truncated or foreign image file; ``file`` names it and ``problem`` says what is wrong."""

    def __init__(self, file: str, problem: str) -> None:
        problem = " ".join(str(problem).split())
        super().__init__(f"{file}: {problem}", pid=None, errno=errno.EINVAL)
        self.file = file
        self.problem = problem


def pages_file_name(pages_id: int) -> str:
    """File name of the raw pages with ``pages_id`` (``pagemap_head.pages_id``)."""
    return f"pages-{pages_id}.img"


def pagemap_file_name(pid: int) -> str:
    """File name of the pagemap of ``pid``."""
    return f"pagemap-{pid}.img"


# ---------------------------------------------------------------------------------------------- ranges


def _as_ranges(r: np.ndarray, what: str) -> np.ndarray:
    r = np.asarray(r)
    if r.size == 0:
        return np.zeros((0, 2), dtype=np.uint64)
    if r.ndim != 2 or r.shape[1] != 2:
        raise ValueError(f"{what}: expected an n×2 array of [start, end), got shape {r.shape}")
    return r.astype(np.uint64, copy=False)


def entries_from_ranges(present: np.ndarray, parent: np.ndarray) -> np.ndarray:
    """Pagemap entries for ``present`` (PE_PRESENT) and ``parent`` (PE_PARENT) page ranges.

    Both are n×2 uint64 [start, end) arrays, page-aligned, sorted and merged, disjoint from each other.
    Returns ENTRY_DTYPE entries sorted by vaddr, touching ranges with the same flag merged.
    """
    present, parent = _as_ranges(present, "present"), _as_ranges(parent, "parent")
    if PAGE == 4096:  # one linear native pass when the ranges keep the rules (the writer's always do)
        a, b = np.ascontiguousarray(present), np.ascontiguousarray(parent)
        out = np.empty(len(a) + len(b), dtype=ENTRY_DTYPE)
        n = lib.wpd_pagemap_entries(ffi.cast("const uint64_t *", a.ctypes.data), len(a), PE_PRESENT,
                                    ffi.cast("const uint64_t *", b.ctypes.data), len(b), PE_PARENT,
                                    ffi.cast("void *", out.ctypes.data))
        if n >= 0:
            return out[:n]
    return _entries_sorted(present, parent)


def _entries_sorted(present: np.ndarray, parent: np.ndarray) -> np.ndarray:
    """entries_from_ranges by a sort of all ranges (takes them in any order; says what breaks the rules)."""
    starts = np.concatenate((present[:, 0], parent[:, 0]))
    ends = np.concatenate((present[:, 1], parent[:, 1]))
    flags = np.concatenate(
        (np.full(len(present), PE_PRESENT, np.uint32), np.full(len(parent), PE_PARENT, np.uint32))
    )
    if len(starts) == 0:
        return np.zeros(0, dtype=ENTRY_DTYPE)
    if ((starts | ends) & np.uint64(PAGE - 1)).any():
        raise ValueError("page ranges must be page-aligned")
    if (ends <= starts).any():
        raise ValueError("page ranges must be non-empty [start, end)")
    order = np.argsort(starts, kind="stable")
    starts, ends, flags = starts[order], ends[order], flags[order]
    if (starts[1:] < ends[:-1]).any():
        raise ValueError("page ranges overlap: present and parent must be merged and disjoint")
    new = np.ones(len(starts), dtype=bool)
    new[1:] = (starts[1:] != ends[:-1]) | (flags[1:] != flags[:-1])
    first = np.flatnonzero(new)
    last = np.append(first[1:] - 1, len(starts) - 1)
    out = np.empty(len(first), dtype=ENTRY_DTYPE)
    out["vaddr"] = starts[first]
    out["nr_pages"] = (ends[last] - starts[first]) >> np.uint64(12)
    out["flags"] = flags[first]
    return out


def page_offsets(entries: np.ndarray, addrs: np.ndarray) -> np.ndarray:
    """Offset in the pages file of each page address (sorted or not): the file holds the pages of the PE_PRESENT
    entries back to back, in entry order; -1 for an address in no PE_PRESENT entry."""
    addrs = np.asarray(addrs, dtype=np.uint64)
    out = np.full(len(addrs), -1, dtype=np.int64)
    present = (entries["flags"] & PE_PRESENT) != 0
    e = entries[present]
    if not len(e) or not len(addrs):
        return out
    starts = e["vaddr"].astype(np.uint64)
    nbytes = e["nr_pages"].astype(np.uint64) * np.uint64(PAGE)
    base = np.concatenate(([0], np.cumsum(nbytes)[:-1])).astype(np.int64)
    j = np.searchsorted(starts, addrs, side="right") - 1
    ok = j >= 0
    ok[ok] = addrs[ok] < starts[j[ok]] + nbytes[j[ok]]
    out[ok] = base[j[ok]] + (addrs[ok] - starts[j[ok]]).astype(np.int64)
    return out


def ranges_of(entries: np.ndarray, flag: int | None = None) -> np.ndarray:
    """n×2 uint64 [start, end) ranges covered by the entries having ``flag`` (all if None), merged."""
    if entries.dtype == ENTRY_DTYPE and entries.flags.c_contiguous and (flag is None or 0 < flag <= 0xFFFFFFFF):
        out = np.empty((len(entries), 2), dtype=np.uint64)  # one native pass (entries in address order)
        n = lib.wpd_pagemap_ranges(ffi.from_buffer(entries), len(entries), flag or 0,
                                   ffi.cast("uint64_t *", out.ctypes.data))
        return out[:n]
    if flag is not None:
        entries = entries[(entries["flags"] & np.uint32(flag)) != 0]
    if len(entries) == 0:
        return np.zeros((0, 2), dtype=np.uint64)
    starts = entries["vaddr"].astype(np.uint64)
    ends = starts + (entries["nr_pages"].astype(np.uint64) << np.uint64(12))
    new = np.ones(len(starts), dtype=bool)
    new[1:] = starts[1:] != ends[:-1]
    first = np.flatnonzero(new)
    last = np.append(first[1:] - 1, len(starts) - 1)
    return np.column_stack((starts[first], ends[last]))


# ---------------------------------------------------------------------------------------------- framing


def _describe_magic(m: int) -> str:
    name = MAGICS.get(m)
    return f"{m:#010x} ({name})" if name else f"{m:#010x}"


def _check_magic(data: bytes, name: str, kind: str, head: int | None, magic: int) -> int:
    """Check the head magic (if any) and the image magic; returns the offset of the first message."""
    need = 4 if head is None else 8
    if len(data) < need:
        raise ImageError(name, f"truncated {kind} image: {len(data)} bytes, shorter than its {need}-byte magic")
    if head is not None:
        (m,) = _U32.unpack_from(data, 0)
        if m != head:
            raise ImageError(
                name, f"not a {kind} image: head magic {_describe_magic(m)}, expected {_describe_magic(head)}"
            )
    (m,) = _U32.unpack_from(data, need - 4)
    if m != magic:
        raise ImageError(name, f"not a {kind} image: magic {_describe_magic(m)}, expected {_describe_magic(magic)}")
    return need


def frames(data: bytes, name: str, off: int) -> tuple[list[int], list[int]]:
    """Payload offsets and sizes of the u32-length-prefixed messages from ``off`` to the end of ``data``."""
    offs: list[int] = []
    sizes: list[int] = []
    n = len(data)
    unpack = _U32.unpack_from
    while off < n:
        if n - off < 4:
            raise ImageError(name, f"truncated: {n - off} stray bytes at offset {off:#x}, too few for a length")
        (size,) = unpack(data, off)
        off += 4
        if size > n - off:
            raise ImageError(
                name, f"truncated: message at offset {off - 4:#x} claims {size} bytes, only {n - off} left"
            )
        offs.append(off)
        sizes.append(size)
        off += size
    return offs, sizes


def _frame(payload: bytes) -> bytes:
    return _U32.pack(len(payload)) + payload


def _parse(cls, data: bytes, off: int, size: int, name: str, what: str):
    off, size = int(off), int(size)
    try:
        msg = cls.FromString(data[off : off + size])
    except DecodeError as e:
        raise ImageError(name, f"{what} at offset {off - 4:#x} does not parse: {e}") from None
    if not msg.IsInitialized():  # upb parses messages that lack required fields: CRIU would not
        missing = ", ".join(msg.FindInitializationErrors())
        raise ImageError(name, f"{what} at offset {off - 4:#x} lacks required {missing}")
    return msg


def _single(data: bytes, name: str, off: int, cls, what: str):
    offs, sizes = frames(data, name, off)
    if not offs:
        raise ImageError(name, f"no {what} after the magic")
    if len(offs) > 1:
        raise ImageError(name, f"{len(offs) - 1} unexpected messages after the {what}")
    return _parse(cls, data, offs[0], sizes[0], name, what)


# ---------------------------------------------------------------------------------------------- pagemap

_TAG_VADDR, _TAG_COMPAT, _TAG_FLAGS, _TAG_NR = 0x08, 0x10, 0x20, 0x28  # (field << 3) | varint


def _entry_columns(entries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """vaddr, compat_nr_pages, flags, nr_pages as uint64 arrays, validated for writing."""
    vaddr = np.asarray(entries["vaddr"]).astype(np.uint64)
    nr = np.asarray(entries["nr_pages"]).astype(np.uint64)
    flags = np.asarray(entries["flags"]).astype(np.uint64)
    bad = _validate(vaddr, nr, flags)
    if bad is not None:
        raise ValueError(f"entry {bad[0]}: {bad[1]}")
    # CRIU >= 4.0 reads nr_pages (5); older readers, Debian 12's pycriu among them, only the u32 in field 2.
    # Where the count does not fit, write 0 there as CRIU 4 always does.
    compat = np.where(nr <= np.uint64(0xFFFFFFFF), nr, np.uint64(0))
    return vaddr, compat, flags, nr


def _pagemap_magics(pages_id: int) -> bytes:
    if not 0 <= pages_id <= 0xFFFFFFFF:
        raise ValueError(f"pages_id {pages_id} does not fit in a u32")
    return struct.pack("<II", IMG_COMMON_MAGIC, PAGEMAP_MAGIC)


def encode_pagemap(pages_id: int, entries: np.ndarray) -> bytes:
    """A whole pagemap-PID.img: magics, ``pagemap_head{pages_id}``, one ``pagemap_entry`` per entry.

    Each entry sets vaddr (1), compat_nr_pages (2, u32), flags (4) and nr_pages (5, u64), like CRIU 4 but
    with field 2 filled in for readers that predate field 5.
    """
    magics = _pagemap_magics(pages_id)
    head = pagemap_pb2.pagemap_head(pages_id=pages_id).SerializeToString()
    start = magics + _frame(head)
    if PAGE == 4096 and entries.dtype == ENTRY_DTYPE:  # one native pass, the checks included
        packed = np.ascontiguousarray(entries)
        buf = np.empty(len(start) + 48 * len(packed), dtype=np.uint8)
        buf[: len(start)] = np.frombuffer(start, dtype=np.uint8)
        body = buf[len(start) :]
        n = lib.wpd_pagemap_encode_entries(ffi.cast("const void *", packed.ctypes.data), len(packed),
                                           ffi.cast("uint8_t *", body.ctypes.data), len(body))
        if n >= 0:
            return buf[: len(start) + n].tobytes()
    cols = [np.ascontiguousarray(c, dtype=np.uint64) for c in _entry_columns(entries)]  # says what is wrong
    buf = np.empty(len(start) + 48 * len(cols[0]), dtype=np.uint8)
    buf[: len(start)] = np.frombuffer(start, dtype=np.uint8)
    ptr = [ffi.cast("const uint64_t *", c.ctypes.data) for c in cols]
    body = buf[len(start) :]
    n = lib.wpd_pagemap_encode(*ptr, len(cols[0]), ffi.cast("uint8_t *", body.ctypes.data), len(body))
    return buf[: len(start) + n].tobytes()


def encode_pagemap_pb(pages_id: int, entries: np.ndarray) -> bytes:
    """Reference for encode_pagemap with the generated protobuf classes (one Python object per entry)."""
    out = [_pagemap_magics(pages_id), _frame(pagemap_pb2.pagemap_head(pages_id=pages_id).SerializeToString())]
    vaddr, compat, flags, nr = _entry_columns(entries)
    pe = pagemap_pb2.pagemap_entry
    for v, c, f, n in zip(vaddr.tolist(), compat.tolist(), flags.tolist(), nr.tolist(), strict=True):
        out.append(_frame(pe(vaddr=v, compat_nr_pages=c, flags=f, nr_pages=n).SerializeToString()))
    return b"".join(out)


def _validate(vaddr: np.ndarray, nr: np.ndarray, flags: np.ndarray) -> tuple[int, str] | None:
    """First entry breaking the pagemap's rules, as (index, problem), or None."""
    checks = (
        (vaddr & np.uint64(PAGE - 1)) != 0,
        nr == 0,
        (flags & ~np.uint64(PE_KNOWN)) != 0,
        flags == 0,
        (flags & np.uint64(PE_PARENT | PE_PRESENT)) == np.uint64(PE_PARENT | PE_PRESENT),
    )
    for i, bad in enumerate(checks):
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            problem = (
                f"vaddr {int(vaddr[j]):#x} is not page-aligned",
                f"nr_pages is 0 (vaddr {int(vaddr[j]):#x})",
                f"unknown flags {int(flags[j]):#x} (known: PE_PARENT 1, PE_LAZY 2, PE_PRESENT 4)",
                "flags are 0: neither present, in the parent nor lazy",
                "flags say both PE_PARENT and PE_PRESENT",
            )[i]
            return j, problem
    over = (vaddr > np.uint64(_MAX_END)) | (nr > ((np.uint64(_MAX_END) - np.minimum(vaddr, _MAX_END)) >> 12))
    if over.any():
        j = int(np.flatnonzero(over)[0])
        return j, f"{int(nr[j])} pages at {int(vaddr[j]):#x} run past the end of the address space"
    ends = vaddr + (nr << np.uint64(12))
    back = vaddr[1:] < ends[:-1]
    if back.any():
        j = int(np.flatnonzero(back)[0]) + 1
        what = "descending" if vaddr[j] < vaddr[j - 1] else "overlapping the previous entry"
        return j, f"vaddr {int(vaddr[j]):#x} is {what} (previous: {int(vaddr[j - 1]):#x}, {int(nr[j - 1])} pages)"
    return None


def _finish(name: str, offs: list[int], vaddr, nr, flags) -> np.ndarray:
    bad = _validate(vaddr, nr, flags)
    if bad is not None:
        j, problem = bad
        raise ImageError(name, f"pagemap entry {j} at offset {int(offs[j + 1]) - 4:#x}: {problem}")
    out = np.empty(len(vaddr), dtype=ENTRY_DTYPE)
    out["vaddr"], out["nr_pages"], out["flags"] = vaddr, nr, flags
    return out


def _decode_entries_pb(data: bytes, name: str, offs: list[int], sizes: list[int]):
    n = len(offs) - 1
    vaddr = np.empty(n, np.uint64)
    nr = np.empty(n, np.uint64)
    flags = np.empty(n, np.uint64)
    pe = pagemap_pb2.pagemap_entry
    for i in range(n):
        m = _parse(pe, data, offs[i + 1], sizes[i + 1], name, f"pagemap entry {i}")
        vaddr[i] = m.vaddr
        nr[i] = m.nr_pages if m.HasField("nr_pages") else m.compat_nr_pages
        f = m.flags
        if m.in_parent:  # images older than the flags field (CRIU's init_compat_pagemap_entry)
            f |= PE_PARENT
        elif not m.HasField("flags"):
            f = PE_PRESENT
        flags[i] = f
    return vaddr, nr, flags


def _frames_np(raw: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Vectorised frames for messages shorter than 256 bytes whose fields are all varints, or None.

    In such messages no two zero bytes follow each other (a zero is a whole varint, after a non-zero tag),
    so every non-zero byte followed by three zeros is a length prefix. The guess is then checked to be
    exactly the chain of lengths from ``start`` to the end; anything else is left to frames.
    """
    body = raw[start:]
    if len(body) < 4:
        return None
    z = body == 0
    cand = np.flatnonzero(~z[:-3] & z[1:-2] & z[2:-1] & z[3:])
    if len(cand) == 0 or cand[0] != 0:
        return None
    size = body[cand].astype(np.int64)
    nxt = cand + 4 + size
    if (nxt[:-1] != cand[1:]).any() or nxt[-1] != len(body):
        return None
    return cand + (start + 4), size


def _varints(raw: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Values and lengths of the varints at ``pos`` in ``raw`` (padded past the end), None if one is too long."""
    val = np.zeros(len(pos), dtype=np.uint64)
    ln = np.zeros(len(pos), dtype=np.int64)
    act = np.arange(len(pos))
    for k in range(10):
        b = raw[pos[act] + k]
        if k == 9 and (b > 1).any():
            return None  # more than 64 bits
        val[act] |= (b & 0x7F).astype(np.uint64) << np.uint64(7 * k)
        done = b < 0x80
        ln[act[done]] = k + 1
        act = act[~done]
        if len(act) == 0:
            return val, ln
    return None


def _decode_entries_np(data: bytes, offs: np.ndarray, sizes: np.ndarray):
    """Vectorised parse of pagemap_entry messages laid out as protobuf writes them: varint fields in field
    order (vaddr, compat_nr_pages, in_parent?, flags?, nr_pages?), nothing else.

    Returns None for any other layout: the protobuf classes then parse it (and say what is wrong, if anything).
    """
    off = np.asarray(offs[1:], dtype=np.int64)
    end = off + np.asarray(sizes[1:], dtype=np.int64)
    n = len(off)
    raw = np.frombuffer(data + bytes(16), dtype=np.uint8)  # varints may be read past the end, then rejected
    pos = off.copy()
    cols = {}
    for field in (1, 2, 3, 4, 5):
        has = (pos < end) & (raw[pos] == field << 3)
        if field <= 2 and not has.all():
            return None
        sel = pos if field <= 2 else pos[has]
        got = _varints(raw, sel + 1)
        if got is None:
            return None
        if field <= 2:
            cols[field] = got[0]
            pos += 1 + got[1]
        else:
            v = np.zeros(n, dtype=np.uint64)
            v[has] = got[0]
            cols[field] = (v, has)
            pos[has] += 1 + got[1]
    if (pos != end).any():
        return None
    vaddr = cols[1]
    compat = cols[2] & np.uint64(0xFFFFFFFF)
    nr, has_nr = cols[5]
    nr = np.where(has_nr, nr, compat)
    flags, has_flags = cols[4]
    flags &= np.uint64(0xFFFFFFFF)
    in_parent = cols[3][0] != 0
    flags = np.where(in_parent, flags | np.uint64(PE_PARENT), np.where(has_flags, flags, np.uint64(PE_PRESENT)))
    return vaddr, nr, flags


def _decode_native(data: bytes, name: str, off: int) -> tuple[int, np.ndarray] | None:
    """The pagemap in native passes (wpd_pagemap_decode: count the frames, then fill the entries, no array
    larger than the result: fresh memory is slow to touch in this VM), or None for anything the protobuf paths
    must parse (and explain): a truncated frame, a field out of order or unknown."""
    if len(data) - off < 4:
        return None
    (size,) = _U32.unpack_from(data, off)
    body = off + 4 + size
    if body > len(data):
        return None
    head = _parse(pagemap_pb2.pagemap_head, data, off + 4, size, name, "pagemap_head")
    raw = ffi.from_buffer("uint8_t[]", data)[body : len(data)] if body < len(data) else None
    if raw is None:
        return head.pages_id, np.zeros(0, dtype=ENTRY_DTYPE)
    n = lib.wpd_pagemap_decode(raw, len(raw), ffi.NULL, ffi.NULL, len(raw))
    if n < 0:
        return None
    out = np.empty(n, dtype=ENTRY_DTYPE)
    if lib.wpd_pagemap_decode(raw, len(raw), ffi.from_buffer(out), ffi.NULL, n) != n:
        return None  # -EDOM (an entry breaks the rules: the numpy path says which) or -EINVAL
    return head.pages_id, out


def _decode_pagemap(data: bytes, name: str, vectorised: bool) -> tuple[int, np.ndarray]:
    data = bytes(data)
    off = _check_magic(data, name, "pagemap", IMG_COMMON_MAGIC, PAGEMAP_MAGIC)
    if vectorised:
        done = _decode_native(data, name, off)
        if done is not None:
            return done
    fast = _frames_np(np.frombuffer(data, dtype=np.uint8), off) if vectorised else None
    offs, sizes = fast if fast is not None else frames(data, name, off)
    if not len(offs):
        raise ImageError(name, "no pagemap_head after the magic")
    head = _parse(pagemap_pb2.pagemap_head, data, offs[0], sizes[0], name, "pagemap_head")
    cols = _decode_entries_np(data, offs, sizes) if vectorised else None
    if cols is None:
        cols = _decode_entries_pb(data, name, offs, sizes)
    return head.pages_id, _finish(name, offs, *cols)


def decode_pagemap(data: bytes, name: str) -> tuple[int, np.ndarray]:
    """``(pages_id, entries)`` of a pagemap image; ImageError naming ``name`` if it is corrupt or foreign.

    Entries must be page-aligned, ascending, non-overlapping, with nr_pages > 0 and known flags. nr_pages
    (field 5) is preferred, else compat_nr_pages (2); entries from before the flags field get CRIU's defaults.
    """
    return _decode_pagemap(data, name, vectorised=True)


def decode_pagemap_pb(data: bytes, name: str) -> tuple[int, np.ndarray]:
    """Reference for decode_pagemap with the generated protobuf classes."""
    return _decode_pagemap(data, name, vectorised=False)


# ---------------------------------------------------------------------------------------------- inventory


def encode_inventory(dump_uptime_us: int, pre_dump: bool) -> bytes:
    """inventory.img as CRIU writes it: INVENTORY_MAGIC (no head magic) and one ``inventory_entry``.

    A pre-dump's holds dump_uptime and pre_dump_mode (CRIU's default, PRE_DUMP_SPLICE); a dump's the
    prepare_inventory() fields wpdump can state: fdinfo_per_id, ns_per_id, and dump_uptime. img_version is
    CRTOOLS_IMAGES_V1_1 in both (CRIU leaves a pre-dump's at 0 only because it never fills it in).
    """
    inv = inventory_pb2.inventory_entry(img_version=CRTOOLS_IMAGES_V1_1, dump_uptime=dump_uptime_us)
    if pre_dump:
        inv.pre_dump_mode = PRE_DUMP_SPLICE
    else:
        inv.fdinfo_per_id = True
        inv.ns_per_id = True
    return _U32.pack(INVENTORY_MAGIC) + _frame(inv.SerializeToString())


def decode_inventory(data: bytes, name: str) -> inventory_pb2.inventory_entry:
    """The ``inventory_entry`` of an inventory image (fields dump_uptime, img_version, pre_dump_mode, ...)."""
    data = bytes(data)
    off = _check_magic(data, name, "inventory", None, INVENTORY_MAGIC)
    inv = _single(data, name, off, inventory_pb2.inventory_entry, "inventory_entry")
    if inv.img_version not in (0, CRTOOLS_IMAGES_V1_1):  # 0: a CRIU pre-dump's
        raise ImageError(name, f"unsupported image version {inv.img_version} (expected {CRTOOLS_IMAGES_V1_1})")
    return inv


# ---------------------------------------------------------------------------------------------- stats


def _is_required(f) -> bool:
    req = getattr(f, "is_required", None)  # protobuf >= 6.31 (where .label is deprecated)
    return bool(req) if req is not None else f.label == f.LABEL_REQUIRED


_DUMP_STATS_FIELDS = {f.name: f for f in stats_pb2.dump_stats_entry.DESCRIPTOR.fields}
_DUMP_STATS_REQUIRED = [f.name for f in _DUMP_STATS_FIELDS.values() if _is_required(f)]


def encode_stats(**fields: int) -> bytes:
    """stats-dump: IMG_SERVICE_MAGIC, STATS_MAGIC, one ``stats_entry{dump = dump_stats_entry{fields}}``.

    Required fields not given are 0; optional ones are written only when given. Times are microseconds.
    """
    unknown = sorted(set(fields) - set(_DUMP_STATS_FIELDS))
    if unknown:
        raise TypeError(f"unknown dump_stats_entry fields: {', '.join(unknown)}")
    values = dict.fromkeys(_DUMP_STATS_REQUIRED, 0) | fields
    try:
        dump = stats_pb2.dump_stats_entry(**{k: int(v) for k, v in values.items()})
        payload = stats_pb2.stats_entry(dump=dump).SerializeToString()
    except (ValueError, TypeError, EncodeError) as e:
        raise ValueError(f"dump_stats_entry: {e}") from None
    return struct.pack("<II", IMG_SERVICE_MAGIC, STATS_MAGIC) + _frame(payload)


def decode_stats(data: bytes, name: str) -> dict[str, int]:
    """The fields set in a stats-dump file's ``dump_stats_entry``."""
    data = bytes(data)
    off = _check_magic(data, name, "stats", IMG_SERVICE_MAGIC, STATS_MAGIC)
    st = _single(data, name, off, stats_pb2.stats_entry, "stats_entry")
    if not st.HasField("dump"):
        raise ImageError(name, "stats_entry holds no dump statistics")
    return {f.name: int(v) for f, v in st.dump.ListFields()}
