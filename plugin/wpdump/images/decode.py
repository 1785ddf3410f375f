"""``wpdump decode``: one image file as JSON in the shape ``crit decode`` gives it.

crit (pycriu's ``images.load``) turns an image into ``{"magic": NAME, "entries": [...]}``, one dict per protobuf
message holding the fields that are set, in field-number order; enums become their names; the pagemap's first
entry is its ``pagemap_head``. With ``--pretty`` it indents by 4 and shows the fields CRIU's protos mark
``(criu).hex`` as "0x..." strings and ``(criu).flags`` as "PE_PARENT | PE_PRESENT" strings; of the images here
only ``pagemap_entry.vaddr`` and ``.flags`` are marked.

Pagemap entries are shown as pycriu 3.17 (Debian 12's crit) shows them: field 2 is called ``nr_pages``, and the
CRIU 4 field 5 ``nr_pages`` (u64) it does not know is folded into that one value, so an entry of more than 2³²-1
pages shows its true count where crit 3.17 would show the 0 CRIU 4 leaves in field 2. CRIU 4's crit names the fields
compat_nr_pages (2) and nr_pages (5) instead. Fields wpdump's protos lack (an inventory's root_ids, from CRIU's
core.proto) are left out.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import re
import struct

from google.protobuf.descriptor import FieldDescriptor as FD
from google.protobuf.message import DecodeError

from ..criu_pb import inventory_pb2, pagemap_pb2, stats_pb2
from ..errors import WpdumpError
from . import format as images

__all__ = ["DecodeImageError", "decode_bytes", "decode_file", "dumps"]

# criu/include/magic.h: the other images crit knows (wpdump does not decode them)
_OTHER_MAGICS = {
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
_PMAP_FLAGS = (("PE_PARENT", images.PE_PARENT), ("PE_LAZY", images.PE_LAZY), ("PE_PRESENT", images.PE_PRESENT))
_HEX = {("pagemap_entry", "vaddr")}
_FLAGS = {("pagemap_entry", "flags"): _PMAP_FLAGS}
_U32 = struct.Struct("<I")


class DecodeImageError(WpdumpError):
    """The file is not an image wpdump can decode (raw pages, another image type, corrupt)."""


def _map_flags(value: int, names: tuple[tuple[str, int], ...]) -> str:
    """pycriu's pb2dict.map_flags: "A | B", unknown bits appended as hex, "" for 0."""
    parts = [n for n, bit in names if value & bit]
    rest = value & ~sum(bit for _, bit in names)
    if rest:
        parts.append(f"{rest:#x}")
    return " | ".join(parts)


def _value(msg_name: str, field, value, pretty: bool):
    if field.type == FD.TYPE_MESSAGE:
        return _to_dict(value, pretty)
    if field.type == FD.TYPE_ENUM:
        v = field.enum_type.values_by_number.get(value)
        return v.name if v is not None else None
    if field.type == FD.TYPE_BOOL:
        return bool(value)
    if field.type == FD.TYPE_BYTES:
        return base64.encodebytes(value).decode()
    if field.type == FD.TYPE_STRING:
        return str(value)
    value = int(value)
    if pretty:
        if (msg_name, field.name) in _HEX:
            return f"{value:#x}"
        names = _FLAGS.get((msg_name, field.name))
        if names is not None:
            return _map_flags(value, names)
    return value


def _to_dict(msg, pretty: bool) -> dict:
    name = msg.DESCRIPTOR.name
    out: dict = {}
    for field, value in msg.ListFields():
        if field.label == FD.LABEL_REPEATED:
            out[field.name] = [_value(name, field, v, pretty) for v in value]
        else:
            out[field.name] = _value(name, field, value, pretty)
    return out


def _pagemap_entry(msg, pretty: bool) -> dict:
    """A pagemap_entry as pycriu 3.17 names its fields: vaddr, nr_pages (field 2's place), in_parent, flags."""
    d = _to_dict(msg, pretty)
    nr = d.pop("nr_pages", None)
    compat = d.pop("compat_nr_pages", None)
    out: dict = {}
    for key in ("vaddr",):
        if key in d:
            out[key] = d.pop(key)
    if compat is not None or nr is not None:
        out["nr_pages"] = nr if nr is not None else compat
    out.update(d)  # in_parent, flags (field order)
    return out


def _frames(data: bytes, name: str, off: int) -> list[bytes]:
    msgs = []
    n = len(data)
    while off < n:
        if n - off < 4:
            raise DecodeImageError(f"{name}: truncated: {n - off} stray bytes at offset {off:#x}", errno=errno.EINVAL)
        (size,) = _U32.unpack_from(data, off)
        if size > n - off - 4:
            raise DecodeImageError(
                f"{name}: truncated: message at offset {off:#x} claims {size} bytes, only {n - off - 4} left",
                errno=errno.EINVAL,
            )
        msgs.append(data[off + 4 : off + 4 + size])
        off += 4 + size
    return msgs


def _parse(cls, raw: bytes, name: str, what: str, i: int):
    try:
        return cls.FromString(raw)
    except DecodeError as e:
        raise DecodeImageError(f"{name}: {what} (message {i}) does not parse: {e}", errno=errno.EINVAL) from None


def _raw_pages_error(name: str, size: int, magic: int) -> DecodeImageError:
    pages = f"{size // images.PAGE} pages" + (f" and {size % images.PAGE} bytes" if size % images.PAGE else "")
    base = os.path.basename(name)
    if re.fullmatch(r"pages-\d+\.img", base):
        what = f"raw page data ({pages}), not a protobuf image: nothing to decode"
    else:
        what = f"unknown magic {magic:#010x}: not a CRIU image (raw data such as a pages-N.img? {pages})"
    return DecodeImageError(f"{name}: {what}", errno=errno.EINVAL)


def decode_bytes(data: bytes, name: str = "<image>", pretty: bool = False) -> dict:
    """``{"magic": ..., "entries": [...]}`` of a pagemap, inventory or stats image held in ``data``."""
    data = bytes(data)
    if len(data) < 4:
        raise DecodeImageError(f"{name}: {len(data)} bytes, too short for an image magic", errno=errno.EINVAL)
    (m,) = _U32.unpack_from(data, 0)
    off = 4
    if m in (images.IMG_COMMON_MAGIC, images.IMG_SERVICE_MAGIC):
        if len(data) < 8:
            raise DecodeImageError(f"{name}: truncated after the head magic", errno=errno.EINVAL)
        (m,) = _U32.unpack_from(data, 4)
        off = 8
    if m == images.PAGEMAP_MAGIC:
        msgs = _frames(data, name, off)
        entries = []
        for i, raw in enumerate(msgs):
            if i == 0:
                entries.append(_to_dict(_parse(pagemap_pb2.pagemap_head, raw, name, "pagemap_head", i), pretty))
            else:
                entries.append(_pagemap_entry(_parse(pagemap_pb2.pagemap_entry, raw, name, "pagemap_entry", i), pretty))
        return {"magic": "PAGEMAP", "entries": entries}
    if m == images.INVENTORY_MAGIC:
        msgs = _frames(data, name, off)
        cls = inventory_pb2.inventory_entry
        return {"magic": "INVENTORY", "entries": [_to_dict(_parse(cls, r, name, "inventory_entry", i), pretty)
                                                  for i, r in enumerate(msgs)]}
    if m == images.STATS_MAGIC:
        msgs = _frames(data, name, off)
        cls = stats_pb2.stats_entry
        return {"magic": "STATS", "entries": [_to_dict(_parse(cls, r, name, "stats_entry", i), pretty)
                                              for i, r in enumerate(msgs)]}
    if m in _OTHER_MAGICS:
        raise DecodeImageError(
            f"{name}: a {_OTHER_MAGICS[m]} image: wpdump decodes pagemap, inventory and stats images only (use crit)",
            errno=errno.EINVAL,
        )
    raise _raw_pages_error(name, len(data), m)


def decode_file(path: str, pretty: bool = False) -> dict:
    """decode_bytes of the file at ``path``."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DecodeImageError(f"{path}: {e.strerror}", errno=e.errno) from None
    return decode_bytes(data, path, pretty)


def dumps(img: dict, pretty: bool = False) -> str:
    """The JSON text crit prints (without its trailing newline): compact, or indented by 4 with --pretty."""
    return json.dumps(img, indent=4 if pretty else None)
