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
        if field.is_repeated if hasattr(field, "is_repeated") else field.label == FD.LABEL_REPEATED:
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
    """The messages from ``off`` on (images.frames, its ImageError as this module's error)."""
    try:
        offs, sizes = images.frames(data, name, off)
    except images.ImageError as e:
        raise DecodeImageError(str(e), errno=errno.EINVAL) from None
    return [data[o : o + n] for o, n in zip(offs, sizes, strict=True)]


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
    if m in images.MAGICS:
        raise DecodeImageError(
            f"{name}: a {images.MAGICS[m]} image: wpdump decodes pagemap, inventory and stats images only (use crit)",
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
