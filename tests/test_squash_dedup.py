"""squash and dedup on chains that pre-dump/dump wrote of a real process, checked page by page against the chain
(read independently by tests/chaincheck.py) and against the process's memory."""

from __future__ import annotations

import json
import os
import signal

import pycriu.images
import pytest
from chaincheck import PE_PRESENT, compare_with_memory, load_pagemap, reconstruct, shared_pages
from test_show_verify import Chain, assert_one_line_error, page_offset, pages_of, run, state
from wpdump.chainops import check, squash, verify
from wpdump.chainops.dedup import dedup

PAGE = 4096


@pytest.fixture
def made(target, tmp_path) -> Chain:
    return Chain(target, tmp_path)


# ---------------------------------------------------------------------------------------------- squash


def test_squash_equals_the_chain(made, tmp_path):
    c = made
    out = tmp_path / "squashed"
    res = run("squash", "-D", c.top, "-O", out, "--json")
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    shm = sorted(n for n in os.listdir(c.top) if n.startswith("pagemap-shmem-") or n.startswith("pages-"))
    shm.remove("pages-1.img")  # the shared objects, stored whole in the top: copied as they are
    assert shm and r["out"] == str(out) and r["levels"] == 3
    assert r["copied"] == sorted(["inventory.img", "stats-dump", *shm])
    assert sorted(os.listdir(out)) == sorted(["inventory.img", f"pagemap-{c.pid}.img", "pages-1.img", "stats-dump",
                                              "wpdump.json", *shm])
    assert not os.path.lexists(out / "parent")
    for name in ("inventory.img", "stats-dump"):
        assert (out / name).read_bytes() == open(os.path.join(c.top, name), "rb").read()

    # pycriu reads it: every entry PE_PRESENT, the pages file holds exactly them
    pages_id, entries = load_pagemap(str(out), c.pid)
    assert pages_id == 1 and entries and all(e["flags"] == PE_PRESENT for e in entries)
    assert os.path.getsize(out / "pages-1.img") == sum(e["nr_pages"] for e in entries) * PAGE == r["bytes"]
    for name in ("inventory.img", "stats-dump", f"pagemap-{c.pid}.img"):
        with open(out / name, "rb") as f:
            assert pycriu.images.load(f)["entries"]

    # page for page the chain's top, and the process's memory
    want, _ = reconstruct(c.top, c.pid)
    got, depth = reconstruct(str(out), c.pid)
    assert got.keys() == want.keys() and len(got) == r["pages"]
    assert all(got[p] == want[p] for p in want)
    assert set(depth.values()) == {0}
    compare_with_memory(str(out), c.pid)
    v = verify.verify_process(c.pid, str(out))
    assert v.ok and v.levels == 1 and v.pages_listed == len(want) + len(shared_pages(str(out), c.pid))
    assert check.check_chain(str(out)).ok

    meta = json.loads((out / "wpdump.json").read_text())
    assert meta["parent_iteration"] is None and meta["squashed"]["from"] == c.dirs[::-1]

    # small batches give the same file; the destination must be new or empty
    r2 = squash.squash(c.top, str(tmp_path / "small"), batch_bytes=3 * PAGE)
    assert (tmp_path / "small" / "pages-1.img").read_bytes() == (out / "pages-1.img").read_bytes()
    assert r2.pages == r["pages"]
    assert_one_line_error(run("squash", "-D", c.top, "-O", out), "not empty")
    assert_one_line_error(run("squash", "-D", tmp_path / "nowhere", "-O", tmp_path / "x"), "does not exist")
    assert not os.path.exists(tmp_path / "x")


def test_squash_of_a_pre_dump_is_a_usable_parent(made, tmp_path):
    """A squashed pre-dump is the same iteration: the next pre-dump of the tracked process builds on it."""
    from wpdump.dump import iteration

    c = made
    os.kill(c.pid, signal.SIGCONT)  # the dump left the target stopped; tracking ended with the dump
    out = tmp_path / "base"
    c.t.cmd("poke", hex(c.a), "9")
    iteration.pre_dump(c.pid, str(tmp_path / "p1"))
    c.t.cmd("poke", hex(c.a), "10,11")
    iteration.pre_dump(c.pid, str(tmp_path / "p2"), "../p1")
    squash.squash(str(tmp_path / "p2"), str(out))
    c.t.cmd("poke", hex(c.a), "12")
    r = iteration.dump(c.pid, str(tmp_path / "final"), "../base", leave_stopped=True)
    assert r.incremental and r.pages_parent > 300 and not r.warnings
    assert verify.verify_process(c.pid, str(tmp_path / "final")).ok
    compare_with_memory(str(tmp_path / "final"), c.pid)


# ---------------------------------------------------------------------------------------------- dedup


def holes(path: str) -> set[int]:
    """Page offsets of a file that are holes (SEEK_HOLE / SEEK_DATA)."""
    out: set[int] = set()
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            h = os.lseek(fd, pos, os.SEEK_HOLE)
            if h >= size:
                break
            try:
                d = os.lseek(fd, h, os.SEEK_DATA)
            except OSError:  # ENXIO: a hole up to the end
                d = size
            out.update(range(h, d, PAGE))
            pos = d
    finally:
        os.close(fd)
    return out


def test_dedup_frees_superseded_pages(made):
    c = made
    _, depth = reconstruct(c.top, c.pid)  # which level the top reads each page from (independent reader)
    expected = {}
    for k, d in ((1, c.dirs[1]), (2, c.dirs[0])):
        present = pages_of(d, c.pid, PE_PRESENT)
        expected[d] = present - {p for p, lv in depth.items() if lv == k}
    assert expected[c.dirs[0]] and expected[c.dirs[1]]  # pokes and dontneed superseded pages in both
    sizes = {d: os.path.getsize(os.path.join(d, "pages-1.img")) for d in c.dirs}
    before_top = reconstruct(c.top, c.pid)[0]

    res = run("dedup", "-D", c.top, "--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    dry = json.loads(res.stdout)
    assert dry["bytes_freed"] == 0 and all(not holes(os.path.join(d, "pages-1.img")) for d in c.dirs)
    assert [lv["pages_superseded"] for lv in dry["levels"]] == [len(expected[c.dirs[1]]), len(expected[c.dirs[0]])]

    res = run("dedup", "-D", c.top, "--json")
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert [lv["path"] for lv in r["levels"]] == [c.dirs[1], c.dirs[0]]
    want_pages = sum(len(v) for v in expected.values())
    assert r["pages_superseded"] == want_pages
    for lv in r["levels"]:
        d = lv["path"]
        pages = os.path.join(d, "pages-1.img")
        # exactly the superseded pages are holes now, and the file kept its size
        assert holes(pages) == {page_offset(d, c.pid, p) for p in expected[d]}
        assert os.path.getsize(pages) == sizes[d]
        # freed: the blocks of those pages (an extent-tree block may be added to map the holes)
        assert lv["pages_superseded"] * PAGE - 2 * PAGE <= lv["bytes_freed"] <= lv["pages_superseded"] * PAGE
        assert lv["allocated_before"] - lv["allocated_after"] == lv["bytes_freed"]
    assert r["bytes_freed"] >= want_pages * PAGE - 4 * PAGE
    assert os.path.getsize(os.path.join(c.top, "pages-1.img")) == sizes[c.top] and not holes(
        os.path.join(c.top, "pages-1.img"))

    # the chain still reads as before and equals the stopped process
    assert reconstruct(c.top, c.pid)[0] == before_top
    assert check.check_chain(c.top).ok
    v = verify.verify_process(c.pid, c.top)
    assert v.ok, [str(m) for m in v.first]
    compare_with_memory(c.top, c.pid)
    assert state(c.pid) == "T"
    # but a parent alone no longer equals what it held: punched pages read zero
    p = min(expected[c.dirs[0]])
    with open(os.path.join(c.dirs[0], "pages-1.img"), "rb") as f:
        f.seek(page_offset(c.dirs[0], c.pid, p))
        assert f.read(PAGE) == bytes(PAGE)

    again = dedup(c.top)
    assert again.bytes_freed == 0 and again.pages_superseded == want_pages  # already holes

    res = run("dedup", "-D", c.top)
    assert res.returncode == 0 and "freed 0 bytes" in res.stdout, res.stdout
    assert "NO LONGER complete" in run("dedup", "--help").stdout


def test_dedup_refuses_a_broken_chain(made):
    c = made
    os.truncate(os.path.join(c.dirs[0], "pages-1.img"), PAGE)
    assert_one_line_error(run("dedup", "-D", c.top), "pages-1.img", "present pages")
    assert not holes(os.path.join(c.dirs[1], "pages-1.img"))  # nothing was punched
