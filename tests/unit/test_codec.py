"""Image codec against protobuf's own encoder and decoder: pagemap (vectorised and reference), inventory, stats,
the magics of criu/include/magic.h, and ``wpdump decode``'s crit-shaped JSON."""

from __future__ import annotations

import json
import struct
import warnings

import numpy as np
import pytest
from google.protobuf.internal import encoder as pb_encoder
from wpdump.criu_pb import inventory_pb2, pagemap_pb2, stats_pb2
from wpdump.images import decode
from wpdump.images import format as images

PAGE = 4096
U32 = struct.Struct("<I")


def test_magics_are_criu_s() -> None:
    """criu/include/magic.h, typed in from CRIU's source."""
    assert images.IMG_COMMON_MAGIC == 0x54564319
    assert images.IMG_SERVICE_MAGIC == 0x55105940
    assert images.PAGEMAP_MAGIC == 0x56084025
    assert images.INVENTORY_MAGIC == 0x58313116
    assert images.STATS_MAGIC == 0x57093306
    assert (images.PE_PARENT, images.PE_LAZY, images.PE_PRESENT) == (1, 2, 4)  # criu/include/pagemap.h
    assert images.pagemap_file_name(42) == "pagemap-42.img" and images.pages_file_name(3) == "pages-3.img"


def frames(data: bytes, off: int) -> list[bytes]:
    """An independent reader of the u32-length-prefixed messages."""
    out = []
    while off < len(data):
        (n,) = U32.unpack_from(data, off)
        out.append(data[off + 4 : off + 4 + n])
        off += 4 + n
    assert off == len(data)
    return out


def random_entries(rng: np.random.Generator, n: int) -> np.ndarray:
    """Sorted, disjoint entries; page counts of every varint width, some beyond u32; flags CRIU writes."""
    nr = rng.integers(1, 1 << rng.integers(1, 30, n), dtype=np.uint64)
    big = rng.random(n) < 0.05
    nr[big] = rng.integers(1 << 32, 1 << 34, int(big.sum()), dtype=np.uint64)
    gaps = rng.integers(0, 1 << 12, n, dtype=np.uint64) * (rng.random(n) < 0.6)
    first = np.cumsum(gaps + np.concatenate(([0], nr[:-1]))).astype(np.uint64)
    e = np.zeros(n, dtype=images.ENTRY_DTYPE)
    e["vaddr"] = (first + np.uint64(rng.integers(0, 1 << 24))) * np.uint64(PAGE)
    e["nr_pages"] = nr
    e["flags"] = rng.choice([images.PE_PRESENT, images.PE_PARENT, images.PE_LAZY, images.PE_PRESENT | images.PE_LAZY],
                            n)
    return e


@pytest.mark.parametrize("n", [0, 1, 2, 300])
def test_encode_pagemap_is_what_protobuf_reads(n: int) -> None:
    rng = np.random.default_rng(60 + n)
    e = random_entries(rng, n)
    pages_id = int(rng.integers(0, 1 << 32))
    data = images.encode_pagemap(pages_id, e)
    assert data == images.encode_pagemap_pb(pages_id, e)
    assert data[:8] == struct.pack("<II", images.IMG_COMMON_MAGIC, images.PAGEMAP_MAGIC)
    msgs = frames(data, 8)
    assert len(msgs) == n + 1
    assert pagemap_pb2.pagemap_head.FromString(msgs[0]).pages_id == pages_id
    for row, raw in zip(e.tolist(), msgs[1:], strict=True):
        m = pagemap_pb2.pagemap_entry.FromString(raw)
        vaddr, nr, flags = row
        assert (m.vaddr, m.nr_pages, m.flags, m.HasField("in_parent")) == (vaddr, nr, flags, False)
        assert m.compat_nr_pages == (nr if nr < 1 << 32 else 0)
        assert raw == m.SerializeToString()  # field order and varints as protobuf writes them
    for dec in (images.decode_pagemap, images.decode_pagemap_pb):
        got_id, got = dec(data, "pagemap-1.img")
        assert got_id == pages_id and got.dtype == images.ENTRY_DTYPE and got.tolist() == e.tolist()


def test_pagemap_extremes_round_trip() -> None:
    top = (1 << 64) - PAGE
    e = np.zeros(3, dtype=images.ENTRY_DTYPE)
    e[0] = (0, 1, images.PE_PRESENT)
    e[1] = (PAGE, (1 << 52) - 4, images.PE_PARENT)  # ends two pages below the last one
    e[2] = (top - PAGE, 1, images.PE_LAZY)
    for pages_id in (0, 0xFFFFFFFF):
        data = images.encode_pagemap(pages_id, e)
        assert data == images.encode_pagemap_pb(pages_id, e)
        assert images.decode_pagemap(data, "x")[1].tolist() == e.tolist()
    with pytest.raises(ValueError):
        images.encode_pagemap(1 << 32, e)


def _varint(v: int, pad: int = 0) -> bytes:
    out = bytearray(pb_encoder._VarintBytes(v))
    for _ in range(pad):  # an over-long encoding of the same value, which protobuf also accepts
        out[-1] |= 0x80
        out.append(0)
    return bytes(out)


def test_decode_pagemap_of_other_writers() -> None:
    """Entries as older CRIUs or other protobuf writers lay them out: no nr_pages (compat only), in_parent
    without flags, neither (present), unknown fields, over-long varints. Expected values: CRIU's
    init_compat_pagemap_entry rules, written out here."""
    rng = np.random.default_rng(70)
    rows, raws = [], []
    addr = 1 << 30
    for i in range(400):
        nr = int(rng.integers(1, 1 << 20))
        m = pagemap_pb2.pagemap_entry(vaddr=addr, compat_nr_pages=nr)
        style = i % 6
        flags = images.PE_PRESENT
        if style == 1:
            m.nr_pages = nr
            m.compat_nr_pages = 0
            m.flags = flags = images.PE_PARENT
        elif style == 2:
            m.in_parent = True
            flags = images.PE_PARENT
        elif style == 3:
            m.flags = flags = images.PE_LAZY
            m.in_parent = False
        raw = m.SerializeToString()
        if style == 4:  # an unknown field (number 15, varint) after the known ones
            raw += bytes([15 << 3]) + _varint(123456)
        elif style == 5:  # over-long varints, built by hand
            raw = (bytes([1 << 3]) + _varint(addr, 2) + bytes([2 << 3]) + _varint(nr, 1)
                   + bytes([4 << 3]) + _varint(4, 3))
        assert pagemap_pb2.pagemap_entry.FromString(raw).vaddr == addr
        rows.append((addr, nr, flags))
        raws.append(raw)
        addr += (nr + int(rng.integers(0, 3))) * PAGE
    data = (struct.pack("<II", images.IMG_COMMON_MAGIC, images.PAGEMAP_MAGIC)
            + b"".join(U32.pack(len(r)) + r for r in [pagemap_pb2.pagemap_head(pages_id=5).SerializeToString(), *raws]))
    for dec in (images.decode_pagemap, images.decode_pagemap_pb):
        pid, got = dec(data, "pagemap-9.img")
        assert pid == 5 and got.tolist() == rows
    # each style alone, through the vectorised path where it applies
    for style in range(6):
        sub = raws[style::6]
        one = (data[:8] + U32.pack(2) + pagemap_pb2.pagemap_head(pages_id=5).SerializeToString()
               + b"".join(U32.pack(len(r)) + r for r in sub))
        assert images.decode_pagemap(one, "p")[1].tolist() == rows[style::6], style


def test_entries_and_ranges_against_pages() -> None:
    rng = np.random.default_rng(80)
    for _ in range(100):
        cells = rng.choice(3, size=64, p=[0.4, 0.3, 0.3])  # 0 absent, 1 present, 2 parent

        def runs(k: int, cells: np.ndarray = cells) -> np.ndarray:
            idx = np.flatnonzero(cells == k)
            pairs = []
            for i in idx.tolist():
                if pairs and pairs[-1][1] == i * PAGE:
                    pairs[-1][1] += PAGE
                else:
                    pairs.append([i * PAGE, (i + 1) * PAGE])
            return np.array(pairs, dtype=np.uint64).reshape(-1, 2)
        present, parent = runs(1), runs(2)
        e = images.entries_from_ranges(present, parent)
        for row in e.tolist():
            v, n, f = row
            k = 1 if f == images.PE_PRESENT else 2
            assert (cells[v // PAGE : v // PAGE + n] == k).all()
        assert int(e["nr_pages"].sum()) == int((cells > 0).sum())
        assert images.ranges_of(e, images.PE_PRESENT).tolist() == present.tolist()
        assert images.ranges_of(e, images.PE_PARENT).tolist() == parent.tolist()
        both = sorted(present.tolist() + parent.tolist())
        merged = []
        for s, t in both:
            if merged and merged[-1][1] == s:
                merged[-1][1] = t
            else:
                merged.append([s, t])
        assert images.ranges_of(e).tolist() == merged


def test_inventory_as_protobuf_reads_it() -> None:
    for pre_dump in (False, True):
        data = images.encode_inventory(123456789012, pre_dump)
        assert U32.unpack_from(data, 0)[0] == images.INVENTORY_MAGIC  # no head magic
        (raw,) = frames(data, 4)
        inv = inventory_pb2.inventory_entry.FromString(raw)
        assert inv.img_version == images.CRTOOLS_IMAGES_V1_1 == 2 and inv.dump_uptime == 123456789012
        if pre_dump:
            assert inv.pre_dump_mode == images.PRE_DUMP_SPLICE == 1 and not inv.HasField("fdinfo_per_id")
        else:
            assert inv.fdinfo_per_id and inv.ns_per_id and not inv.HasField("pre_dump_mode")
        assert images.decode_inventory(data, "inventory.img") == inv


def test_stats_as_protobuf_reads_it() -> None:
    data = images.encode_stats(frozen_time=17, pages_scanned=1 << 40, pages_written=3, page_pipes=2)
    assert data[:8] == struct.pack("<II", images.IMG_SERVICE_MAGIC, images.STATS_MAGIC)
    (raw,) = frames(data, 8)
    st = stats_pb2.stats_entry.FromString(raw)
    assert st.HasField("dump") and not st.HasField("restore")
    required = {"freezing_time", "frozen_time", "memdump_time", "memwrite_time", "pages_scanned",
                "pages_skipped_parent", "pages_written", "pages_lazy"}
    want = dict.fromkeys(required, 0) | {"frozen_time": 17, "pages_scanned": 1 << 40, "pages_written": 3,
                                          "page_pipes": 2}
    assert {f.name: v for f, v in st.dump.ListFields()} == want
    assert images.decode_stats(data, "stats-dump") == want
    with pytest.raises(TypeError):
        images.encode_stats(no_such_field=1)
    with pytest.raises(ValueError):
        images.encode_stats(frozen_time=1 << 32)  # a uint32 field


@pytest.mark.parametrize(("data", "problem"), [
    (b"", "truncated"),
    (struct.pack("<II", images.IMG_COMMON_MAGIC, images.INVENTORY_MAGIC), "magic"),
    (struct.pack("<II", images.IMG_SERVICE_MAGIC, images.PAGEMAP_MAGIC), "head magic"),
    (struct.pack("<II", images.IMG_COMMON_MAGIC, images.PAGEMAP_MAGIC), "no pagemap_head"),
    (struct.pack("<IIIB", images.IMG_COMMON_MAGIC, images.PAGEMAP_MAGIC, 5, 8), "truncated"),
])
def test_decode_pagemap_rejects(data: bytes, problem: str) -> None:
    for dec in (images.decode_pagemap, images.decode_pagemap_pb):
        with pytest.raises(images.ImageError, match=problem) as ei:
            dec(data, "pagemap-7.img")
        assert ei.value.file == "pagemap-7.img"


# ------------------------------------------------------------------------------------------------ decode.py

def test_decode_json_of_a_pagemap() -> None:
    e = np.zeros(3, dtype=images.ENTRY_DTYPE)
    e[0] = (0x10000, 2, images.PE_PRESENT)
    e[1] = (0x12000, 1, images.PE_PARENT)
    e[2] = (0x20000, 1 << 33, images.PE_PRESENT | images.PE_LAZY)
    data = images.encode_pagemap(7, e)
    got = decode.decode_bytes(data, "pagemap-1.img")
    assert got == {"magic": "PAGEMAP", "entries": [
        {"pages_id": 7},
        {"vaddr": 0x10000, "nr_pages": 2, "flags": 4},
        {"vaddr": 0x12000, "nr_pages": 1, "flags": 1},
        {"vaddr": 0x20000, "nr_pages": 1 << 33, "flags": 6},  # field 5, not field 2's 0
    ]}
    assert [list(d) for d in got["entries"][1:]] == [["vaddr", "nr_pages", "flags"]] * 3  # crit's key order
    pretty = decode.decode_bytes(data, "pagemap-1.img", pretty=True)
    assert pretty["entries"][1:] == [
        {"vaddr": "0x10000", "nr_pages": 2, "flags": "PE_PRESENT"},
        {"vaddr": "0x12000", "nr_pages": 1, "flags": "PE_PARENT"},
        {"vaddr": "0x20000", "nr_pages": 1 << 33, "flags": "PE_LAZY | PE_PRESENT"},
    ]
    assert json.loads(decode.dumps(got)) == got and "\n" not in decode.dumps(got)
    text = decode.dumps(pretty, pretty=True)
    assert json.loads(text) == pretty and text.startswith('{\n    "magic": "PAGEMAP",\n    "entries": [')


def test_decode_json_of_old_entries_and_unknown_flags() -> None:
    head = pagemap_pb2.pagemap_head(pages_id=1).SerializeToString()
    old = pagemap_pb2.pagemap_entry(vaddr=PAGE, compat_nr_pages=3, in_parent=True).SerializeToString()
    odd = pagemap_pb2.pagemap_entry(vaddr=8 * PAGE, compat_nr_pages=1, flags=4 | 0x40).SerializeToString()
    data = struct.pack("<II", images.IMG_COMMON_MAGIC, images.PAGEMAP_MAGIC) + b"".join(
        U32.pack(len(m)) + m for m in (head, old, odd))
    got = decode.decode_bytes(data, pretty=True)["entries"]
    assert got[1] == {"vaddr": "0x1000", "nr_pages": 3, "in_parent": True}
    assert list(got[1]) == ["vaddr", "nr_pages", "in_parent"]
    assert got[2] == {"vaddr": "0x8000", "nr_pages": 1, "flags": "PE_PRESENT | 0x40"}


def test_decode_json_of_inventory_and_stats() -> None:
    inv = decode.decode_bytes(images.encode_inventory(99, pre_dump=False))
    assert inv == {"magic": "INVENTORY", "entries": [
        {"img_version": 2, "fdinfo_per_id": True, "ns_per_id": True, "dump_uptime": 99}]}
    assert list(inv["entries"][0]) == ["img_version", "fdinfo_per_id", "ns_per_id", "dump_uptime"]  # field order
    pre = decode.decode_bytes(images.encode_inventory(5, pre_dump=True))
    assert pre["entries"] == [{"img_version": 2, "dump_uptime": 5, "pre_dump_mode": 1}]
    lsm = inventory_pb2.inventory_entry(img_version=2, lsmtype=inventory_pb2.APPARMOR).SerializeToString()
    got = decode.decode_bytes(U32.pack(images.INVENTORY_MAGIC) + U32.pack(len(lsm)) + lsm)
    assert got["entries"] == [{"img_version": 2, "lsmtype": "APPARMOR"}]  # enums by name
    st = decode.decode_bytes(images.encode_stats(frozen_time=3, shpages_written=4))
    dump = st["entries"][0]["dump"]
    assert st["magic"] == "STATS" and list(st["entries"][0]) == ["dump"]
    assert dump["frozen_time"] == 3 and dump["shpages_written"] == 4 and dump["pages_written"] == 0
    numbers = [stats_pb2.dump_stats_entry.DESCRIPTOR.fields_by_name[k].number for k in dump]
    assert numbers == sorted(numbers)


@pytest.mark.parametrize(("name", "data", "problem"), [
    ("x.img", b"\x01\x02", "too short"),
    ("pages-3.img", bytes(2 * PAGE + 5), "raw page data \\(2 pages and 5 bytes\\)"),
    ("core-1.img", struct.pack("<III", images.IMG_COMMON_MAGIC, 0x55053847, 0), "a CORE image"),
    ("y.img", struct.pack("<I", 0x12345678) + bytes(PAGE), "unknown magic 0x12345678"),
    ("pagemap-1.img", struct.pack("<III", images.IMG_COMMON_MAGIC, images.PAGEMAP_MAGIC, 50), "truncated"),
])
def test_decode_refuses(name: str, data: bytes, problem: str) -> None:
    with pytest.raises(decode.DecodeImageError, match=problem):
        decode.decode_bytes(data, name)


def test_decode_uses_no_deprecated_protobuf_api() -> None:
    """FieldDescriptor.label is deprecated since protobuf 6.31 (upb warns, and does not raise even under
    -W error): wpdump's own code must not call it (Debian's pycriu still does; pyproject.toml filters that)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decode.decode_bytes(images.encode_inventory(1, pre_dump=False))
        decode.decode_bytes(images.encode_stats(frozen_time=1), pretty=True)
        decode.decode_bytes(images.encode_pagemap(1, images.entries_from_ranges(
            np.array([[0, PAGE]], dtype=np.uint64), np.zeros((0, 2), dtype=np.uint64))))
        images.decode_stats(images.encode_stats(), "stats-dump")
    assert [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)] == []


def test_ranges_of_against_pages() -> None:
    """ranges_of (one native pass over the entries): the pages of the entries with the flag, touching runs merged."""
    rng = np.random.default_rng(21)
    for _ in range(500):
        n = int(rng.integers(0, 30))
        cuts = np.sort(rng.choice(400, 2 * n, replace=False)).astype(np.uint64) * np.uint64(PAGE)
        r = cuts.reshape(-1, 2)
        if len(r) > 1:
            glue = rng.random(len(r) - 1) < 0.5
            r[1:, 0] = np.where(glue, r[:-1, 1], r[1:, 0])
        e = np.zeros(len(r), dtype=images.ENTRY_DTYPE)
        e["vaddr"], e["nr_pages"] = r[:, 0], (r[:, 1] - r[:, 0]) // np.uint64(PAGE)
        e["flags"] = rng.choice([images.PE_PARENT, images.PE_PRESENT, images.PE_LAZY], len(r))
        for flag in (None, images.PE_PARENT, images.PE_PRESENT, images.PE_PARENT | images.PE_PRESENT):
            got = images.ranges_of(e, flag)
            pages = {p for v, k, f in e.tolist() if flag is None or f & flag for p in range(v, v + k * PAGE, PAGE)}
            assert {p for s, t in got.tolist() for p in range(s, t, PAGE)} == pages
            assert len(got) < 2 or (got[1:, 0] > got[:-1, 1]).all()  # merged: no two ranges touch
