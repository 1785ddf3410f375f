"""show, decode and verify on chains that pre-dump/dump wrote of a real process (memtarget).

Every verdict of ``verify`` is cross-checked with tests/chaincheck.py, an independent reader (pycriu + plain
Python), and with the target's real memory."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pycriu.images
import pytest
from chaincheck import PE_PARENT, PE_PRESENT, compare_with_memory, load_pagemap, reconstruct, shared_pages
from conftest import unavailable
from wpdump.chainops import check, show, verify
from wpdump.dump import iteration
from wpdump.images import decode
from wpdump.images import format as images
from wpdump.target import freeze

PAGE = 4096
ROOT = pathlib.Path(__file__).resolve().parent.parent
WPDUMP = [sys.executable, "-m", "wpdump.cli"]
CRIT = str(pathlib.Path(sys.executable).parent / "crit")


def run(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([*WPDUMP, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=ROOT)


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("wpdump: "), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def wait_stopped(pid: int) -> None:
    for _ in range(2000):
        if state(pid) == "T":
            return
        time.sleep(0.001)
    raise AssertionError("target did not stop")


READ_NR = {"x86_64": 0, "aarch64": 63}.get(os.uname().machine, 0)


def wait_blocked_in_read(pid: int) -> None:
    """Until the target sleeps in read() for its next command: the reply it just wrote does not mean it is
    done changing its memory (stdio state, its stack) on the way back to read(). A dump taken before that would
    not equal its memory once it runs on."""
    for _ in range(4000):
        with open(f"/proc/{pid}/syscall") as f:
            words = f.read().split()
        if words and words[0] == str(READ_NR) and state(pid) == "S":
            return
        time.sleep(0.0005)
    raise AssertionError(f"pid {pid} does not block in read()")


class Chain:
    """Three iterations of a memtarget: pre-dump 1, pre-dump 2, final dump 3 (target left stopped)."""

    def __init__(self, t, root: pathlib.Path) -> None:
        self.t = t
        self.pid = t.pid
        f = root / "mapped.bin"
        f.write_bytes(bytes(range(256)) * 16 * 16)  # 16 pages of file content
        self.a = t.map(512)
        t.cmd("fill", hex(self.a), 400, 1)
        self.shared = t.map(16, "shared")
        t.cmd("fill", hex(self.shared), 8, 2)
        self.file = t.addr("mapfile", f, 16, "private")
        t.cmd("poke", hex(self.file), "1,5")  # two COW copies, the other pages are the file's
        self.root = root / "img"
        self.root.mkdir()
        self.dirs = [str(self.root / n) for n in ("1", "2", "3")]
        self.r1 = iteration.pre_dump(self.pid, self.dirs[0])
        t.cmd("poke", hex(self.a), "1,2,3,50")
        self.r2 = iteration.pre_dump(self.pid, self.dirs[1], "../1")
        t.cmd("madvise", hex(self.a + 10 * PAGE), 5, "dontneed")
        t.cmd("poke", hex(self.a), "2,60,401")
        wait_blocked_in_read(self.pid)
        self.r3 = iteration.dump(self.pid, self.dirs[2], "../2", leave_stopped=True)
        wait_stopped(self.pid)

    @property
    def top(self) -> str:
        return self.dirs[2]


@pytest.fixture
def made(target, tmp_path) -> Chain:
    return Chain(target, tmp_path)


def stored(d: str, pid: int) -> int:
    """Pages the iteration ``d`` stores: the process's present pages and its shared objects' (stored once)."""
    return len(pages_of(d, pid, PE_PRESENT)) + len(shared_pages(d, pid))


def pages_of(d: str, pid: int, flag: int) -> set[int]:
    _, entries = load_pagemap(d, pid)
    return {p for e in entries if e["flags"] & flag for p in range(e["vaddr"], e["vaddr"] + e["nr_pages"] * PAGE, PAGE)}


def page_offset(d: str, pid: int, addr: int) -> int:
    """Offset of a PE_PRESENT page in d's pages file, from pycriu's reading of the pagemap."""
    _, entries = load_pagemap(d, pid)
    off = 0
    for e in entries:
        if e["flags"] & PE_PRESENT:
            if e["vaddr"] <= addr < e["vaddr"] + e["nr_pages"] * PAGE:
                return off + addr - e["vaddr"]
            off += e["nr_pages"] * PAGE
    raise AssertionError(f"{addr:#x} is not present in {d}")


# ---------------------------------------------------------------------------------------------- show


def test_show_lists_the_chain(made):
    c = made
    info = show.show(c.top, regions=True)
    assert info.problem is None
    assert [lv.path for lv in info.levels] == c.dirs[::-1]
    assert [lv.kind for lv in info.levels] == ["dump", "pre-dump", "pre-dump"]
    for lv, r in zip(info.levels, (c.r3, c.r2, c.r1), strict=True):
        assert lv.pages_present == stored(lv.path, c.pid) == r.pages_written
        assert lv.pages_parent == len(pages_of(lv.path, c.pid, PE_PARENT)) == r.pages_parent
        assert lv.pages_listed == lv.pages_present + lv.pages_parent
        pages_files = [n for n in os.listdir(lv.path) if n.startswith("pages-")]  # its own, its shared objects'
        assert lv.pages_bytes == sum(os.path.getsize(os.path.join(lv.path, n)) for n in pages_files) == r.bytes_written
        assert lv.pages_zeroed == r.pages_zeroed
        assert lv.created is not None and abs(lv.created - time.time()) < 60
        assert sum(g.present for g in lv.regions) == len(pages_of(lv.path, c.pid, PE_PRESENT))  # the process's own
        assert sum(g.parent for g in lv.regions) == lv.pages_parent
        assert all(a.end < b.start for a, b in zip(lv.regions, lv.regions[1:], strict=False))  # gaps between
    assert info.levels[0].frozen_us is not None and info.levels[0].frozen_us > 0
    assert info.levels[1].frozen_us is None and info.levels[2].frozen_us is None
    assert info.levels[0].pages_zeroed >= 5  # the dontneed'ed pages
    # the big mapping is one region in level 1 (400 filled pages without gaps)
    reg = [g for g in info.levels[2].regions if g.start <= c.a < g.end]
    assert reg and reg[0].start == c.a and reg[0].end >= c.a + 400 * PAGE

    r = run("show", "--json", c.top)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == json.loads(json.dumps(show.show(c.top).as_dict()))
    r = run("show", c.top)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 4 and lines[1].split()[1] == "dump" and lines[3].split()[1] == "pre-dump"
    assert lines[1].endswith(c.top)
    r = run("show", "-v", c.top)
    assert r.returncode == 0 and f"{c.a:#014x}-" in r.stdout, r.stdout


def test_show_of_a_criu_dir_and_errors(made, tmp_path):
    c = made
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in os.listdir(c.dirs[0]):
        if name != "wpdump.json":
            os.link(os.path.join(c.dirs[0], name), plain / name)
    [lv] = show.show(str(plain)).levels
    assert lv.kind == "criu" and lv.pages_present == c.r1.pages_written and lv.iteration is None
    assert_one_line_error(run("show", tmp_path / "nowhere"), "does not exist")
    os.remove(os.path.join(c.dirs[0], f"pagemap-{c.pid}.img"))
    r = run("show", c.top)  # the levels that load are shown, then the problem
    assert len(r.stdout.splitlines()) == 3
    assert_one_line_error(r, c.dirs[0], "no pagemap")


# ---------------------------------------------------------------------------------------------- decode


def crit(path: str, pretty: bool) -> subprocess.CompletedProcess:
    return subprocess.run([CRIT, "decode", "-i", path, *(["--pretty"] if pretty else [])],
                          capture_output=True, text=True, timeout=60)


def test_decode_equals_crit(made):
    c = made
    n = 0
    for d in c.dirs:
        for name in (f"pagemap-{c.pid}.img", "inventory.img", "stats-dump"):
            path = os.path.join(d, name)
            for pretty in (False, True):
                with open(path, "rb") as f:
                    want = pycriu.images.load(f, pretty=pretty)  # what crit decode prints, as crit prints it
                got = decode.decode_file(path, pretty=pretty)
                assert got == want, (path, pretty)
                assert decode.dumps(got, pretty) == json.dumps(want, indent=4 if pretty else None)
                if d == c.top:  # the commands themselves, byte for byte
                    want_out = crit(path, pretty)
                    assert want_out.returncode == 0, want_out.stderr
                    got_out = run("decode", path, *(["--pretty"] if pretty else []))
                    assert got_out.returncode == 0, got_out.stderr
                    assert got_out.stdout == want_out.stdout, (path, pretty)
                    n += 1
    assert n == 6
    img = decode.decode_file(os.path.join(c.top, f"pagemap-{c.pid}.img"), pretty=True)
    assert img["magic"] == "PAGEMAP" and img["entries"][0] == {"pages_id": 1}
    assert {e["flags"] for e in img["entries"][1:]} == {"PE_PRESENT", "PE_PARENT"}
    assert all(e["vaddr"].startswith("0x") for e in img["entries"][1:])

    line = assert_one_line_error(run("decode", os.path.join(c.top, "pages-1.img")), "raw page data")
    assert f"({len(pages_of(c.top, c.pid, PE_PRESENT))} pages)" in line
    assert_one_line_error(run("decode", os.path.join(c.top, "nothing.img")), "No such file")


def test_decode_wide_entry_and_in_parent():
    """An entry of more than 2^32-1 pages (CRIU 4's field 5 only) and an old in_parent entry."""
    from wpdump.criu_pb import pagemap_pb2

    head = pagemap_pb2.pagemap_head(pages_id=3).SerializeToString()
    wide = pagemap_pb2.pagemap_entry(vaddr=0x10000, compat_nr_pages=0, flags=PE_PARENT, nr_pages=1 << 33)
    old = pagemap_pb2.pagemap_entry(vaddr=0x7000, compat_nr_pages=2, in_parent=True)
    data = images.encode_pagemap(3, np.zeros(0, dtype=images.ENTRY_DTYPE))[:8]
    for m in (head, old.SerializeToString(), wide.SerializeToString()):
        data += len(m).to_bytes(4, "little") + m
    img = decode.decode_bytes(data, "x", pretty=True)
    assert img["entries"] == [
        {"pages_id": 3},
        {"vaddr": "0x7000", "nr_pages": 2, "in_parent": True},
        {"vaddr": "0x10000", "nr_pages": 1 << 33, "flags": "PE_PARENT"},
    ]
    assert pycriu.images.loads(data, pretty=True)["entries"][1] == img["entries"][1]  # crit: same for old ones


# ---------------------------------------------------------------------------------------------- verify -t


def test_verify_passes_stopped_then_running(made):
    c = made
    r = verify.verify_process(c.pid, c.top)
    assert r.ok, [str(m) for m in r.first]
    assert r.was_stopped and state(c.pid) == "T"  # stopped before: left stopped
    assert r.levels == 3 and r.pages_listed == len(reconstruct(c.top, c.pid)[0]) + len(shared_pages(c.top, c.pid))
    assert r.pages_compared >= r.pages_listed
    compare_with_memory(c.top, c.pid)  # the independent check agrees
    res = run("verify", "-t", c.pid, "-D", c.top)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "equals" in res.stdout and state(c.pid) == "T"

    os.kill(c.pid, signal.SIGCONT)  # the target runs on (idle in read()): verify stops and resumes it
    r = verify.verify_process(c.pid, c.top)
    assert r.ok and not r.was_stopped and r.frozen_s > 0, [str(m) for m in r.first]
    assert state(c.pid) != "T"
    res = run("verify", "-t", c.pid, "-D", c.top, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["ok"], res.stdout + res.stderr
    c.t.cmd("poke", hex(c.a), "7,300")  # it answers; two pages change
    r = verify.verify_process(c.pid, c.top)
    assert state(c.pid) != "T"  # resumed after a failed verify too
    mine = [m for m in r.first if c.a <= m.addr < c.a + 512 * PAGE]
    assert [m.addr for m in mine] == [c.a + 7 * PAGE, c.a + 300 * PAGE]
    assert all(m.kind == "differs" and m.source == c.dirs[0] and m.offset == 0 for m in mine)
    assert mine[0].got == (mine[0].want + 1) % 256


def test_verify_names_a_flipped_byte(made):
    c = made
    addr = c.a + 123 * PAGE  # written in 1 only: the top reads it from 1
    off = page_offset(c.dirs[0], c.pid, addr) + 77
    with open(os.path.join(c.dirs[0], "pages-1.img"), "r+b") as f:
        f.seek(off)
        b = f.read(1)[0]
        f.seek(off)
        f.write(bytes([b ^ 0x40]))
    r = verify.verify_process(c.pid, c.top)
    assert not r.ok and r.mismatches == 1
    [m] = r.first
    assert (m.addr, m.kind, m.source, m.offset, m.want, m.got) == (addr, "differs", c.dirs[0], 77, b ^ 0x40, b)
    assert f"{c.a:#x}-" in m.vma
    res = run("verify", "-t", c.pid, "-D", c.top)
    line = assert_one_line_error(res, "differs", "1 pages", f"{addr:#x}", c.dirs[0])
    assert f"mismatch: {addr:#x} differs (from {c.dirs[0]})" in res.stdout, res.stdout
    assert "first at +0x4d" in res.stdout, line
    assert state(c.pid) == "T"
    assert check.check_chain(c.top).ok  # the structure is fine: only the content differs


def rewrite_pagemap(d: str, pid: int, keep) -> np.ndarray:
    """Rewrite d's pagemap with only the entries ``keep(entries)`` selects; returns the dropped ones."""
    name = os.path.join(d, f"pagemap-{pid}.img")
    with open(name, "rb") as f:
        pages_id, entries = images.decode_pagemap(f.read(), name)
    mask = keep(entries)
    with open(name, "wb") as f:
        f.write(images.encode_pagemap(pages_id, entries[mask]))
    return entries[~mask]


def test_dropped_entries(made):
    c = made
    # a PE_PARENT entry dropped from the top: structurally fine, but those pages now say zero
    first_parent = []

    def drop_first_parent(e):
        keep = np.ones(len(e), dtype=bool)
        j = int(np.flatnonzero((e["flags"] & PE_PARENT) & (e["vaddr"] >= c.a))[0])
        keep[j] = False
        first_parent.append(e[j])
        return keep

    rewrite_pagemap(c.top, c.pid, drop_first_parent)
    assert check.check_chain(c.top).ok
    r = verify.verify_process(c.pid, c.top)
    gone = first_parent[0]
    assert r.mismatches == int(gone["nr_pages"])  # the pages had content
    assert r.first[0].addr == int(gone["vaddr"]) and r.first[0].source == "absent"
    res = run("verify", "-t", c.pid, "-D", c.top)
    assert_one_line_error(res, "absent from the image", f"{int(gone['vaddr']):#x}")

    # a PE_PRESENT entry dropped from the middle level: its pages file no longer matches
    dropped = rewrite_pagemap(c.dirs[1], c.pid, lambda e: np.arange(len(e)) != np.flatnonzero(e["flags"] & 4)[0])
    rep = check.check_chain(c.top)
    assert not rep.ok
    assert any("pages-1.img" in p and c.dirs[1] in p and "present pages" in p for p in rep.problems), rep.problems
    res = run("verify", "-D", c.top)
    line = assert_one_line_error(res, c.dirs[1], "pages-1.img")
    assert len(rep.problems) == 1 and res.stdout.count("problem: ") == 0  # one problem: said once
    assert line.count(c.dirs[1]) == 1 and c.top not in line
    assert len(dropped) == 1


def test_broken_parent_link(made):
    c = made
    link = os.path.join(c.dirs[2], "parent")
    os.remove(link)
    os.symlink("../gone", link)
    res = run("verify", "-D", c.top)
    assert_one_line_error(res, "does not exist", f"parent of {c.dirs[2]}")
    os.remove(link)  # no link at all, yet entries in the parent
    rep = check.check_chain(c.top)
    assert len(rep.problems) == 1 and "no parent link" in rep.problems[0]
    assert_one_line_error(run("verify", "-D", c.top), "marked in-parent", "no parent link")
    os.symlink("../3", link)  # a loop
    assert_one_line_error(run("verify", "-D", c.top), "loop")
    assert_one_line_error(run("verify", "-t", c.pid, "-D", c.top), "loop")  # verify -t checks the chain too
    assert state(c.pid) == "T"


def test_truncated_pages_file_and_several_problems(made):
    c = made
    pages = os.path.join(c.dirs[0], "pages-1.img")
    size = os.path.getsize(pages)
    os.truncate(pages, size - PAGE)
    rep = check.check_chain(c.top)
    assert len(rep.problems) == 1
    assert f"{size - PAGE} bytes" in rep.problems[0] and pages in rep.problems[0]
    assert_one_line_error(run("verify", "-D", c.top), pages, f"{size - PAGE} bytes")
    # more damage elsewhere: every problem is reported, not only the first
    with open(os.path.join(c.dirs[1], "stats-dump"), "r+b") as f:
        f.write(b"\0\0\0\0")
    with open(os.path.join(c.dirs[2], "inventory.img"), "r+b") as f:
        f.write(b"XXXX")
    rep = check.check_chain(c.top)
    assert len(rep.problems) == 3, rep.problems
    assert "inventory" in rep.problems[0] and "stats" in rep.problems[1] and pages in rep.problems[2]
    res = run("verify", "-D", c.top)
    assert_one_line_error(res, "3 problems", "listed above")
    assert res.stdout.count("problem: ") == 3


def test_verify_errors_are_one_line(made, tmp_path):
    c = made
    with open(os.path.join(c.dirs[2], f"pagemap-{c.pid}.img"), "r+b") as f:
        f.seek(4)
        f.write(b"\1\2\3\4")
    assert_one_line_error(run("verify", "-D", c.top), "not a pagemap image")
    assert_one_line_error(run("verify", "-D", tmp_path / "none"), "does not exist")
    os.kill(c.pid, signal.SIGKILL)
    c.t.proc.wait()
    assert_one_line_error(run("verify", "-t", c.pid, "-D", c.dirs[1]), "no such process")


def test_verify_ignores_the_rseq_fields_the_kernel_writes(made):
    """Resumed on another CPU, a thread finds its rseq cpu_id rewritten by the kernel: not a difference."""
    c = made
    with freeze.Freezer(c.pid) as fr:
        areas = fr.rseq_areas()
    assert state(c.pid) == "T"  # asking leaves the target stopped
    if len(os.sched_getaffinity(0)) < 2 or not areas:
        unavailable("needs two CPUs and a glibc that registers rseq")
    [(ptr, size)] = areas
    assert size >= 32
    cpu = int.from_bytes(c.t.read_mem(ptr + 4, 4), "little")  # rseq cpu_id as the dump saw it
    other = min(os.sched_getaffinity(0) - {cpu})
    os.sched_setaffinity(c.pid, {other})
    os.kill(c.pid, signal.SIGCONT)
    wait_blocked_in_read(c.pid)
    assert int.from_bytes(c.t.read_mem(ptr + 4, 4), "little") == other  # the kernel wrote it
    strict = verify.verify_process(c.pid, c.top, rseq=False)
    assert not strict.ok and strict.mismatches == 1
    assert strict.first[0].addr == ptr & ~(PAGE - 1) and strict.first[0].offset == (ptr & (PAGE - 1))
    r = verify.verify_process(c.pid, c.top)
    assert r.ok and r.rseq_bytes_ignored >= 2, [str(m) for m in r.first]
    assert any("rseq" in n for n in r.notes)
    assert state(c.pid) != "T"
