"""CRIU image format: round trips, vectorised codec against the protobuf reference, pycriu/crit reading what we
write, our generated modules beside pycriu's in one process, corrupt and foreign inputs."""

from __future__ import annotations

import errno
import io
import json
import pathlib
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from wpdump import ranges
from wpdump.criu_pb import inventory_pb2, pagemap_pb2, stats_pb2
from wpdump.images import format as im

# Debian 12's pycriu calls FieldDescriptor.label, deprecated in protobuf 6.31+.
pytestmark = pytest.mark.filterwarnings("ignore:label\\(\\) is deprecated:DeprecationWarning")

PAGE = im.PAGE
CRIT = pathlib.Path(sys.executable).parent / "crit"


def R(*pairs: tuple[int, int]) -> np.ndarray:
    return np.array(pairs, dtype=np.uint64).reshape(-1, 2)


def make_entries(vaddr, nr, flags) -> np.ndarray:
    e = np.empty(len(vaddr), dtype=im.ENTRY_DTYPE)
    e["vaddr"], e["nr_pages"], e["flags"] = vaddr, nr, flags
    return e


def random_entries(rng: np.random.Generator, n: int, huge: bool = True) -> np.ndarray:
    """Sorted, disjoint entries with page counts of every varint width (some beyond u32 when ``huge``)."""
    nr = rng.integers(1, 1 << rng.integers(1, 28, n), dtype=np.uint64)
    if huge:
        big = rng.random(n) < 0.01
        nr[big] = rng.integers(1 << 32, 1 << 36, big.sum(), dtype=np.uint64)
    gaps = rng.integers(0, 1 << 20, n, dtype=np.uint64) * (rng.random(n) < 0.7)
    pages = np.cumsum(gaps + np.concatenate(([0], nr[:-1]))).astype(np.uint64)
    vaddr = (pages + np.uint64(rng.integers(0, 1 << 20))) * np.uint64(PAGE)
    flags = rng.choice(np.array([im.PE_PRESENT, im.PE_PARENT, im.PE_PRESENT | im.PE_LAZY, im.PE_LAZY]), n)
    return make_entries(vaddr, nr, flags)


def frame(msg) -> bytes:
    payload = msg if isinstance(msg, bytes) else msg.SerializeToString()
    return struct.pack("<I", len(payload)) + payload


PM_MAGICS = struct.pack("<II", im.IMG_COMMON_MAGIC, im.PAGEMAP_MAGIC)


def raw_pagemap(*entries, pages_id: int = 1) -> bytes:
    """A pagemap written field by field, for layouts our encoder never produces."""
    return PM_MAGICS + frame(pagemap_pb2.pagemap_head(pages_id=pages_id)) + b"".join(frame(e) for e in entries)


@pytest.fixture(scope="module")
def pycriu_images():
    try:
        import pycriu.images
    except ImportError as e:
        pytest.fail(f"pycriu is not importable from the venv ({e}): run tools/setup")
    return pycriu.images


def crit_decode(path: pathlib.Path) -> dict:
    assert CRIT.exists(), f"{CRIT} missing: run tools/setup"
    out = subprocess.run([str(CRIT), "decode", "-i", str(path), "--pretty"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# ------------------------------------------------------------------------------------------ entries/ranges


def test_entries_from_ranges_merges_sorts_and_flags() -> None:
    present = R((0x1000, 0x3000), (0x5000, 0x6000), (0x9000, 0xA000))
    parent = R((0x3000, 0x5000), (0x6000, 0x7000), (0x7000, 0x8000))  # the last two touch: merged
    e = im.entries_from_ranges(present, parent)
    assert e.dtype == im.ENTRY_DTYPE
    assert e.tolist() == [
        (0x1000, 2, im.PE_PRESENT), (0x3000, 2, im.PE_PARENT), (0x5000, 1, im.PE_PRESENT),
        (0x6000, 2, im.PE_PARENT), (0x9000, 1, im.PE_PRESENT),
    ]
    assert im.ranges_of(e, im.PE_PRESENT).tolist() == present.tolist()
    assert im.ranges_of(e, im.PE_PARENT).tolist() == [[0x3000, 0x5000], [0x6000, 0x8000]]
    assert im.ranges_of(e).tolist() == [[0x1000, 0x8000], [0x9000, 0xA000]]
    assert im.ranges_of(e).dtype == np.uint64


def test_entries_from_ranges_native_pass_equals_the_sort() -> None:
    """The linear native pass (ranges sorted and disjoint, as the writer's) gives what the sort of all ranges gives;
    ranges out of order are left to the sort."""
    rng = np.random.default_rng(11)
    pages = np.unique(rng.integers(0, 50_000, 20_000)).astype(np.uint64)
    kind = rng.integers(0, 3, len(pages))
    present = ranges.from_pages(pages[kind == 1] * np.uint64(0x1000))
    parent = ranges.from_pages(pages[kind == 2] * np.uint64(0x1000))
    want = im._entries_sorted(present, parent)
    assert len(want) > 1000
    assert im.entries_from_ranges(present, parent).tobytes() == want.tobytes()
    shuffled = present[rng.permutation(len(present))]
    assert im.entries_from_ranges(shuffled, parent).tobytes() == want.tobytes()


def test_entries_from_ranges_empty_and_one_sided() -> None:
    empty = np.zeros((0, 2), dtype=np.uint64)
    assert len(im.entries_from_ranges(empty, empty)) == 0
    assert im.ranges_of(im.entries_from_ranges(empty, empty)).shape == (0, 2)
    e = im.entries_from_ranges(empty, R((0x10000, 0x20000)))
    assert e.tolist() == [(0x10000, 16, im.PE_PARENT)]
    assert im.ranges_of(e, im.PE_PRESENT).shape == (0, 2)


@pytest.mark.parametrize(
    "present, parent, match",
    [
        (R((0x1000, 0x3000)), R((0x2000, 0x4000)), "overlap"),
        (R((0x1001, 0x3000)), R(), "page-aligned"),
        (R((0x3000, 0x3000)), R(), "non-empty"),
    ],
)
def test_entries_from_ranges_rejects_bad_input(present, parent, match) -> None:
    with pytest.raises(ValueError, match=match):
        im.entries_from_ranges(present, parent)


def test_entries_from_ranges_random_round_trip() -> None:
    rng = np.random.default_rng(7)
    pages = np.unique(rng.integers(0, 200_000, 60_000)).astype(np.uint64)
    kind = rng.integers(0, 3, len(pages))  # 0: hole, 1: present, 2: parent

    def runs(sel):
        p = pages[sel]
        new = np.ones(len(p), dtype=bool)
        new[1:] = p[1:] != p[:-1] + 1
        first = np.flatnonzero(new)
        last = np.append(first[1:] - 1, len(p) - 1)
        return np.column_stack((p[first], p[last] + 1)).astype(np.uint64) * np.uint64(PAGE)

    present, parent = runs(kind == 1), runs(kind == 2)
    e = im.entries_from_ranges(present, parent)
    assert (e["vaddr"][1:] > e["vaddr"][:-1]).all()
    assert np.array_equal(im.ranges_of(e, im.PE_PRESENT), present)
    assert np.array_equal(im.ranges_of(e, im.PE_PARENT), parent)
    _, back = im.decode_pagemap(im.encode_pagemap(1, e), "x")
    assert np.array_equal(back, e)


# ------------------------------------------------------------------------------------------ pagemap codec


def test_pagemap_layout_is_criu_4_with_compat_count() -> None:
    e = make_entries([0x1000, 0x7F0000000000], [2, 1 << 33], [im.PE_PARENT, im.PE_PRESENT])
    data = im.encode_pagemap(5, e)
    assert data[:8] == PM_MAGICS
    head = pagemap_pb2.pagemap_head(pages_id=5).SerializeToString()
    assert data[8:12] == struct.pack("<I", len(head)) and data[12 : 12 + len(head)] == head
    # vaddr=0x1000, compat_nr_pages=2, flags=PE_PARENT, nr_pages=2: fields in number order
    assert data[12 + len(head) :].startswith(struct.pack("<I", 9) + bytes.fromhex("088020100220012802"))
    msgs = data[12 + len(head) :]
    second = pagemap_pb2.pagemap_entry.FromString(msgs[4 + 9 + 4 :])
    assert second.nr_pages == 1 << 33 and second.compat_nr_pages == 0  # does not fit: 0, as CRIU 4 writes


def test_pagemap_vectorised_matches_protobuf_reference() -> None:
    rng = np.random.default_rng(2024)
    for n in (0, 1, 2, 3, 17, 1000, 20_000):
        e = random_entries(rng, n)
        pages_id = int(rng.integers(0, 1 << 32))
        data = im.encode_pagemap(pages_id, e)
        assert data == im.encode_pagemap_pb(pages_id, e), n
        for decode in (im.decode_pagemap, im.decode_pagemap_pb):
            got_id, got = decode(data, "pagemap-1.img")
            assert got_id == pages_id and got.dtype == im.ENTRY_DTYPE
            assert np.array_equal(got, e), (decode.__name__, n)


def test_pagemap_extremes() -> None:
    top = (1 << 64) - 2 * PAGE
    e = make_entries([0, top], [1, 1], [im.PE_PRESENT, im.PE_PRESENT])
    data = im.encode_pagemap(0xFFFFFFFF, e)
    assert data == im.encode_pagemap_pb(0xFFFFFFFF, e)
    assert im.decode_pagemap(data, "x")[0] == 0xFFFFFFFF
    assert np.array_equal(im.decode_pagemap(data, "x")[1], e)
    with pytest.raises(ValueError):
        im.encode_pagemap(1 << 32, e)
    with pytest.raises(ValueError, match="nr_pages is 0"):
        im.encode_pagemap(1, make_entries([0x1000], [0], [im.PE_PRESENT]))
    with pytest.raises(ValueError, match="overlapping"):
        im.encode_pagemap(1, make_entries([0x1000, 0x2000], [2, 1], [im.PE_PRESENT, im.PE_PARENT]))


def test_pagemap_100k_timing(capsys: pytest.CaptureFixture[str]) -> None:
    """Reports (does not assert) the codec's speed on 100k entries, vectorised against the protobuf classes."""
    e = random_entries(np.random.default_rng(1), 100_000, huge=False)
    data = im.encode_pagemap(1, e)
    times = {}
    for label, fn in (
        ("encode vectorised", lambda: im.encode_pagemap(1, e)),
        ("encode protobuf", lambda: im.encode_pagemap_pb(1, e)),
        ("decode vectorised", lambda: im.decode_pagemap(data, "x")),
        ("decode protobuf", lambda: im.decode_pagemap_pb(data, "x")),
    ):
        best = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        times[label] = best
    with capsys.disabled():
        print("\npagemap, 100k entries:", ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times.items()))


def test_decode_pagemap_older_layouts() -> None:
    pe = pagemap_pb2.pagemap_entry
    data = raw_pagemap(
        # CRIU 4: compat_nr_pages left 0, nr_pages (5) holds the count
        bytes.fromhex("088020100020012802"),
        # CRIU 3: only the u32 count (field 2)
        pe(vaddr=0x10000, compat_nr_pages=3, flags=im.PE_PRESENT),
        # before the flags field: in_parent, or nothing (present)
        pe(vaddr=0x20000, compat_nr_pages=1, in_parent=True),
        pe(vaddr=0x30000, compat_nr_pages=4),
        # fields out of number order: valid protobuf, not what the vectorised parser expects
        bytes.fromhex("2004") + pe(vaddr=0x40000, compat_nr_pages=1).SerializeToString(),
        # an unknown varint field
        pe(vaddr=0x50000, compat_nr_pages=1, flags=im.PE_PRESENT).SerializeToString() + bytes.fromhex("3801"),
    )
    want = [
        (0x1000, 2, im.PE_PARENT), (0x10000, 3, im.PE_PRESENT), (0x20000, 1, im.PE_PARENT),
        (0x30000, 4, im.PE_PRESENT), (0x40000, 1, im.PE_PRESENT), (0x50000, 1, im.PE_PRESENT),
    ]
    for decode in (im.decode_pagemap, im.decode_pagemap_pb):
        assert decode(data, "x")[1].tolist() == want


# ------------------------------------------------------------------------------------------ inventory, stats


def test_inventory_round_trip() -> None:
    pre = im.decode_inventory(im.encode_inventory(123_456_789, pre_dump=True), "inventory.img")
    assert pre.img_version == im.CRTOOLS_IMAGES_V1_1 == 2
    assert pre.dump_uptime == 123_456_789 and pre.HasField("dump_uptime")
    assert pre.pre_dump_mode == im.PRE_DUMP_SPLICE == 1
    assert not pre.HasField("fdinfo_per_id")
    dump = im.decode_inventory(im.encode_inventory(5, pre_dump=False), "inventory.img")
    assert dump.fdinfo_per_id and dump.ns_per_id and dump.dump_uptime == 5
    assert not dump.HasField("pre_dump_mode")
    assert im.encode_inventory(1, True)[:4] == struct.pack("<I", im.INVENTORY_MAGIC)  # no head magic


def test_stats_round_trip_and_framing() -> None:
    data = im.encode_stats(frozen_time=12, pages_scanned=1 << 40, pages_written=3, irmap_resolve=7)
    assert data[:8] == struct.pack("<II", im.IMG_SERVICE_MAGIC, im.STATS_MAGIC)
    st = stats_pb2.stats_entry.FromString(data[12:])
    assert struct.unpack_from("<I", data, 8)[0] == len(data) - 12
    assert st.dump.pages_scanned == 1 << 40 and not st.HasField("restore")
    got = im.decode_stats(data, im.STATS_FILE)
    assert got == {
        "freezing_time": 0, "frozen_time": 12, "memdump_time": 0, "memwrite_time": 0, "pages_scanned": 1 << 40,
        "pages_skipped_parent": 0, "pages_written": 3, "irmap_resolve": 7, "pages_lazy": 0,
    }
    with pytest.raises(TypeError, match="no_such"):
        im.encode_stats(no_such=1)
    with pytest.raises(ValueError):
        im.encode_stats(frozen_time=1 << 32)


# ------------------------------------------------------------------------------------------ pycriu and crit


def test_constants_and_fields_match_debian_pycriu(pycriu_images) -> None:
    from pycriu.images import inventory_pb2 as c_inv
    from pycriu.images import magic
    from pycriu.images import pagemap_pb2 as c_pm
    from pycriu.images import stats_pb2 as c_st

    for name, value in (
        ("IMG_COMMON", im.IMG_COMMON_MAGIC), ("IMG_SERVICE", im.IMG_SERVICE_MAGIC), ("PAGEMAP", im.PAGEMAP_MAGIC),
        ("INVENTORY", im.INVENTORY_MAGIC), ("STATS", im.STATS_MAGIC),
    ):
        assert magic.by_name[name] == value, name

    def fields(msg):
        return {f.number: (f.name, f.type, f.label) for f in msg.DESCRIPTOR.fields}

    for ours, theirs in (
        (inventory_pb2.inventory_entry, c_inv.inventory_entry),
        (stats_pb2.dump_stats_entry, c_st.dump_stats_entry),
        (stats_pb2.restore_stats_entry, c_st.restore_stats_entry),
        (pagemap_pb2.pagemap_head, c_pm.pagemap_head),
    ):
        mine, crius = fields(ours), fields(theirs)
        assert all(crius[k] == v for k, v in mine.items()), ours.DESCRIPTOR.name
    assert set(fields(c_inv.inventory_entry)) - set(fields(inventory_pb2.inventory_entry)) == {3}  # root_ids
    pm, c = fields(pagemap_pb2.pagemap_entry), fields(c_pm.pagemap_entry)
    assert pm[2][1:] == c[2][1:] and c[2][0] == "nr_pages"  # 3.17 names field 2 nr_pages
    assert all(pm[k] == c[k] for k in (1, 3, 4)) and 5 not in c


def test_pycriu_and_crit_read_our_pagemap(tmp_path: pathlib.Path, pycriu_images) -> None:
    rng = np.random.default_rng(5)
    e = random_entries(rng, 300)
    path = tmp_path / im.pagemap_file_name(4242)
    path.write_bytes(im.encode_pagemap(9, e))
    with open(path, "rb") as f:
        img = pycriu_images.load(f)
    assert img["magic"] == "PAGEMAP"
    assert img["entries"][0] == {"pages_id": 9}
    ents = img["entries"][1:]
    assert [x["vaddr"] for x in ents] == e["vaddr"].tolist()
    assert [x["flags"] for x in ents] == e["flags"].tolist()
    # pycriu 3.17 reads field 2 as nr_pages: the count wherever it fits a u32 (always, for real processes)
    nr = e["nr_pages"].tolist()
    assert [x["nr_pages"] for x in ents] == [n if n < 1 << 32 else 0 for n in nr]
    assert sum(n >= 1 << 32 for n in nr) > 0

    small = make_entries([0x1000, 0x3000], [2, 5], [im.PE_PRESENT, im.PE_PARENT | im.PE_LAZY])
    path.write_bytes(im.encode_pagemap(3, small))
    out = crit_decode(path)
    assert out["magic"] == "PAGEMAP"
    assert out["entries"] == [
        {"pages_id": 3},
        {"vaddr": "0x1000", "nr_pages": 2, "flags": "PE_PRESENT"},
        {"vaddr": "0x3000", "nr_pages": 5, "flags": "PE_PARENT | PE_LAZY"},
    ]


def test_pycriu_and_crit_read_our_inventory_and_stats(tmp_path: pathlib.Path, pycriu_images) -> None:
    inv = tmp_path / im.INVENTORY_FILE
    inv.write_bytes(im.encode_inventory(987_654, pre_dump=True))
    with open(inv, "rb") as f:
        img = pycriu_images.load(f)
    assert img == {"magic": "INVENTORY", "entries": [{"img_version": 2, "dump_uptime": 987_654, "pre_dump_mode": 1}]}
    inv.write_bytes(im.encode_inventory(11, pre_dump=False))
    assert crit_decode(inv)["entries"] == [{"img_version": 2, "fdinfo_per_id": True, "ns_per_id": True,
                                            "dump_uptime": 11}]

    st = tmp_path / im.STATS_FILE
    values = {"freezing_time": 1, "frozen_time": 2, "memdump_time": 3, "memwrite_time": 4, "pages_scanned": 5,
              "pages_skipped_parent": 6, "pages_written": 7, "pages_lazy": 8}
    st.write_bytes(im.encode_stats(**values))
    with open(st, "rb") as f:
        img = pycriu_images.load(f)
    assert img == {"magic": "STATS", "entries": [{"dump": values}]}
    assert crit_decode(st)["entries"] == [{"dump": values}]
    assert im.decode_stats(st.read_bytes(), str(st)) == values


def test_pycriu_images_decode_with_ours() -> None:
    """pycriu's own dump() output (its encoder, its descriptors) decodes with ours."""
    import pycriu.images as pycriu_images  # tools/setup installs it: a dependency, not optional
    img = {"magic": "PAGEMAP", "entries": [{"pages_id": 4}, {"vaddr": 0x2000, "nr_pages": 3, "flags": 4}]}
    pid, e = im.decode_pagemap(pycriu_images.dumps(img), "from-pycriu")
    assert pid == 4 and e.tolist() == [(0x2000, 3, im.PE_PRESENT)]
    inv = pycriu_images.dumps({"magic": "INVENTORY", "entries": [{"img_version": 2, "dump_uptime": 3}]})
    assert im.decode_inventory(inv, "from-pycriu").dump_uptime == 3


@pytest.mark.parametrize("order", ["ours-first", "pycriu-first"])
def test_generated_modules_and_pycriu_in_one_process(order: str) -> None:
    ours = ("from wpdump.criu_pb import pagemap_pb2, inventory_pb2, stats_pb2; "
            "from wpdump.images import format as images")
    theirs = "import pycriu, pycriu.images; from pycriu.images import pb"
    code = f"""
{ours if order == "ours-first" else theirs}
{theirs if order == "ours-first" else ours}
from google.protobuf import descriptor_pool
assert pagemap_pb2.pagemap_entry.DESCRIPTOR.full_name == "wpdump_criu.pagemap_entry"
assert pb.pagemap_entry.DESCRIPTOR.full_name == "pagemap_entry"
assert pagemap_pb2.DESCRIPTOR.name == "wpdump/criu_pb/pagemap.proto"
assert pb.pagemap_entry.DESCRIPTOR.file.name == "pagemap.proto"
pool = descriptor_pool.Default()
assert pool.FindMessageTypeByName("pagemap_entry") is pb.pagemap_entry.DESCRIPTOR
assert pool.FindMessageTypeByName("wpdump_criu.pagemap_entry") is pagemap_pb2.pagemap_entry.DESCRIPTOR
raw = pagemap_pb2.pagemap_entry(vaddr=4096, compat_nr_pages=2, flags=4, nr_pages=2).SerializeToString()
assert pb.pagemap_entry.FromString(raw).nr_pages == 2
old = pb.pagemap_entry(vaddr=1, nr_pages=7).SerializeToString()
assert pagemap_pb2.pagemap_entry.FromString(old).compat_nr_pages == 7
assert pb.stats_entry.FromString(stats_pb2.stats_entry(dump=stats_pb2.dump_stats_entry(
    freezing_time=0, frozen_time=0, memdump_time=0, memwrite_time=0, pages_scanned=1, pages_skipped_parent=0,
    pages_written=0, pages_lazy=0)).SerializeToString()).dump.pages_scanned == 1
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ------------------------------------------------------------------------------------------ corrupt input


GOOD = im.encode_pagemap(1, make_entries([0x1000, 0x4000, 0x10000], [2, 1, 300], [4, 1, 6]))
HEAD_END = 8 + 4 + len(pagemap_pb2.pagemap_head(pages_id=1).SerializeToString())
PE = pagemap_pb2.pagemap_entry


def _corrupt_cases() -> list[tuple[str, bytes, str]]:
    bad_len = bytearray(GOOD)
    bad_len[HEAD_END : HEAD_END + 4] = struct.pack("<I", 1000)
    return [
        ("empty file", b"", "truncated pagemap image"),
        ("bad head magic", struct.pack("<II", 0x12345678, im.PAGEMAP_MAGIC) + GOOD[8:], "head magic 0x12345678"),
        ("bad magic", struct.pack("<II", im.IMG_COMMON_MAGIC, 0xDEADBEEF) + GOOD[8:], "magic 0xdeadbeef"),
        ("inventory", im.encode_inventory(1, True), "head magic 0x58313116 (INVENTORY)"),
        ("stats", im.encode_stats(), "head magic 0x55105940 (IMG_SERVICE)"),
        ("core image", struct.pack("<II", im.IMG_COMMON_MAGIC, 0x55053847) + GOOD[8:], "(CORE)"),
        ("magics only", PM_MAGICS, "no pagemap_head"),
        ("cut in a length", GOOD[: HEAD_END + 2], "2 stray bytes"),
        ("cut in a message", GOOD[:-3], "truncated: message at offset"),
        ("length past the end", bytes(bad_len), "claims 1000 bytes"),
        ("garbage message", raw_pagemap(b"\xff\xff\xff"), "does not parse"),
        ("missing required", raw_pagemap(PE(compat_nr_pages=1, flags=4).SerializePartialToString()),
         "lacks required vaddr"),
        ("descending", raw_pagemap(PE(vaddr=0x5000, compat_nr_pages=1), PE(vaddr=0x1000, compat_nr_pages=1)),
         "entry 1 at offset"),
        ("overlapping", raw_pagemap(PE(vaddr=0x1000, compat_nr_pages=4), PE(vaddr=0x3000, compat_nr_pages=1)),
         "overlapping the previous entry"),
        ("zero nr_pages", raw_pagemap(PE(vaddr=0x1000, compat_nr_pages=0, flags=4)), "nr_pages is 0"),
        ("zero nr_pages (5)", raw_pagemap(PE(vaddr=0x1000, compat_nr_pages=3, flags=4, nr_pages=0)),
         "nr_pages is 0"),
        ("unaligned", raw_pagemap(PE(vaddr=0x1234, compat_nr_pages=1)), "not page-aligned"),
        ("unknown flags", raw_pagemap(PE(vaddr=0x1000, compat_nr_pages=1, flags=0x10)), "unknown flags 0x10"),
        ("zero flags", raw_pagemap(PE(vaddr=0x1000, compat_nr_pages=1, flags=0)), "flags are 0"),
        ("parent and present", raw_pagemap(PE(vaddr=0x1000, compat_nr_pages=1, flags=5)), "both"),
        ("past the address space", raw_pagemap(PE(vaddr=(1 << 64) - PAGE, compat_nr_pages=2, flags=4)),
         "past the end of the address space"),
    ]


@pytest.mark.parametrize("decode", [im.decode_pagemap, im.decode_pagemap_pb], ids=["vectorised", "protobuf"])
@pytest.mark.parametrize("label, data, problem", _corrupt_cases(), ids=[c[0] for c in _corrupt_cases()])
def test_decode_pagemap_rejects(decode, label: str, data: bytes, problem: str) -> None:
    name = "/imgs/3/pagemap-77.img"
    with pytest.raises(im.ImageError) as ei:
        decode(data, name)
    e = ei.value
    assert str(e).startswith(name + ": ") and problem in str(e), str(e)
    assert "\n" not in str(e)
    assert e.errno == errno.EINVAL and e.pid is None and e.file == name


@pytest.mark.parametrize(
    "decode, data, problem",
    [
        (im.decode_inventory, GOOD, "not a inventory image: magic 0x54564319 (IMG_COMMON)"),
        (im.decode_inventory, im.encode_inventory(1, True)[:-1], "truncated"),
        (im.decode_inventory, im.encode_inventory(1, True) + frame(b"\x08\x02"), "1 unexpected messages"),
        (im.decode_inventory, struct.pack("<I", im.INVENTORY_MAGIC), "no inventory_entry"),
        (im.decode_inventory, struct.pack("<I", im.INVENTORY_MAGIC) + frame(b"\x08\x07"), "image version 7"),
        (im.decode_inventory, struct.pack("<I", im.INVENTORY_MAGIC) + frame(b"\x40\x01"), "lacks required img_version"),
        (im.decode_stats, GOOD, "head magic 0x54564319 (IMG_COMMON), expected 0x55105940 (IMG_SERVICE)"),
        (im.decode_stats, im.encode_stats()[:9], "stray bytes"),
        (im.decode_stats, struct.pack("<II", im.IMG_SERVICE_MAGIC, im.STATS_MAGIC) + frame(b""), "no dump"),
        (im.decode_stats, struct.pack("<II", im.IMG_SERVICE_MAGIC, im.STATS_MAGIC) + frame(b"\x0a\x02\x08\x01"),
         "lacks required dump.frozen_time"),
        (im.decode_stats, struct.pack("<II", im.IMG_SERVICE_MAGIC, im.STATS_MAGIC) + frame(b"\x0a\x05\x08"),
         "does not parse"),
    ],
)
def test_decode_inventory_and_stats_reject(decode, data: bytes, problem: str) -> None:
    with pytest.raises(im.ImageError) as ei:
        decode(data, "some.img")
    assert str(ei.value).startswith("some.img: ") and problem in str(ei.value), str(ei.value)


def test_every_truncation_and_byte_flip_is_image_error_or_valid() -> None:
    """No input makes a decoder fail with anything but ImageError; both decoders agree."""
    rng = np.random.default_rng(11)
    good = im.encode_pagemap(2, random_entries(rng, 6))
    inputs = [good[:i] for i in range(len(good))]
    for _ in range(400):
        b = bytearray(good)
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
        inputs.append(bytes(b))
    for data in inputs:
        results = []
        for decode in (im.decode_pagemap, im.decode_pagemap_pb):
            try:
                pid, e = decode(data, "f")
                results.append((pid, e.tolist()))
            except im.ImageError as err:
                assert str(err).startswith("f: ")
                results.append("error")
        assert results[0] == results[1], data.hex()
    for data in [im.encode_inventory(3, True)[:i] for i in range(8)] + [im.encode_stats()[:i] for i in range(20)]:
        for decode in (im.decode_inventory, im.decode_stats):
            with pytest.raises(im.ImageError):
                decode(data, "f")


def test_file_names() -> None:
    assert im.pages_file_name(1) == "pages-1.img"
    assert im.pagemap_file_name(4242) == "pagemap-4242.img"
    assert (im.INVENTORY_FILE, im.STATS_FILE) == ("inventory.img", "stats-dump")


def test_encode_accepts_plain_structured_arrays() -> None:
    e = np.array([(0x1000, 1, 4)], dtype=[("vaddr", "<u8"), ("nr_pages", "<u8"), ("flags", "<u4")])
    assert im.encode_pagemap(1, e) == im.encode_pagemap(1, make_entries([0x1000], [1], [4]))
    assert io.BytesIO(im.encode_pagemap(1, e[:0])).read()[:8] == PM_MAGICS
