"""restore-memory: roll a live process's memory back to a checkpoint in place."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from chaincheck import compare_with_memory
from test_iterations import stop_and_wait
from wpdump.chainops.rollback import LayoutMismatch, restore_memory
from wpdump.dump import iteration

PAGE = 4096


def scribble(t, a: int, b: int) -> None:
    """Writes, rewrites, zaps and first touches since the checkpoint."""
    t.cmd("poke", hex(a), "0,1,2,50,99,150")
    t.cmd("fill", hex(a + 10 * PAGE), 20, 9)
    t.cmd("madvise", hex(a + 100 * PAGE), 10, "dontneed")  # filled at the checkpoint: must come back
    t.cmd("poke", hex(a), "200,201,255")  # never touched at the checkpoint: must read zero again
    t.cmd("fill", hex(b), 4, 7)


@pytest.mark.parametrize("tracked", [True, False], ids=["tracked", "full-compare"])
def test_restore_memory_rolls_back_and_the_target_checks_itself(target, tmp_path, tracked):
    t = target
    a = t.map(256)
    t.cmd("fill", hex(a), 160, 3)
    b = t.map(8)
    iteration.pre_dump(t.pid, str(tmp_path / "1"))
    t.cmd("poke", hex(a), "5")
    # Memory is rolled back, not registers: checkpoint and rollback happen with the workload parked at
    # the same place (blocked reading its next command), as a fuzzing harness parks its target.
    t.wait_idle()
    iteration.dump(t.pid, str(tmp_path / "2"), "../1", keep_tracking=True)  # the checkpoint
    want_a, want_b = t.cmd("hash", hex(a), 256)[0], t.cmd("hash", hex(b), 8)[0]
    if not tracked:
        iteration.untrack(t.pid)
    for round_ in range(2):  # a second rollback to the same checkpoint (snapshot fuzzing does many)
        scribble(t, a, b)
        assert t.cmd("hash", hex(a), 256)[0] != want_a
        t.wait_idle()
        r = restore_memory(t.pid, str(tmp_path / "2"))
        assert r.tracked is tracked
        if tracked:
            assert r.pages_examined < 200, r  # only what was dirtied since, not all memory
        assert r.pages_written >= 20 and r.pages_dropped >= 3
        # the workload checks its own memory against checksums it computed at checkpoint time
        assert t.cmd("hash", hex(a), 256)[0] == want_a, f"round {round_}"
        assert t.cmd("hash", hex(b), 8)[0] == want_b
    t.wait_idle()
    os.kill(t.pid, signal.SIGSTOP)
    stop_and_wait(t.pid)
    try:
        r = restore_memory(t.pid, str(tmp_path / "2"))  # a stopped target stays stopped
        with open(f"/proc/{t.pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] == "T"
        compare_with_memory(str(tmp_path / "2"), t.pid)  # the image and the memory agree, page by page
    finally:
        os.kill(t.pid, signal.SIGCONT)
    t.cmd("poke", hex(a), "7")  # and it runs on


def test_restore_memory_refuses_a_changed_layout(target, tmp_path):
    t = target
    a = t.map(64)
    t.cmd("fill", hex(a), 64, 3)
    gone = t.map(4)
    iteration.pre_dump(t.pid, str(tmp_path / "1"))
    t.cmd("poke", hex(a), "1,2")
    t.cmd("munmap", hex(gone), 4)
    before = t.cmd("hash", hex(a), 64)[0]
    with pytest.raises(LayoutMismatch, match=f"{gone:#x}"):
        restore_memory(t.pid, str(tmp_path / "1"))
    assert t.cmd("hash", hex(a), 64)[0] == before  # untouched and running
    p = subprocess.run([sys.executable, "-m", "wpdump.cli", "restore-memory", "-t", str(t.pid), "-D",
                        str(tmp_path / "1")], capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "layout changed" in p.stderr
    new = t.map(4)  # appeared since
    t.cmd("poke", hex(new), "0")
    with pytest.raises(LayoutMismatch):
        restore_memory(t.pid, str(tmp_path / "1"))
    assert t.cmd("hash", hex(a), 64)[0] == before


def test_restore_memory_reads_past_a_guard_page(target, tmp_path):
    """A guard page inside a VMA compared whole: the pages after it are read, not taken for zero."""
    t = target
    a = t.map(16)
    t.cmd("fill", hex(a), 3, 4)
    t.cmd("madvise", hex(a + 3 * PAGE), 1, "guard")  # pages 4..15 stay untouched: zero at the checkpoint
    t.wait_idle()
    iteration.dump(t.pid, str(tmp_path / "1"), keep_tracking=False)
    want_lo, want_hi = t.cmd("hash", hex(a), 3)[0], t.cmd("hash", hex(a + 4 * PAGE), 12)[0]
    t.cmd("poke", hex(a + 4 * PAGE), "0,1,2,3")
    t.cmd("poke", hex(a), "0")
    t.wait_idle()
    r = restore_memory(t.pid, str(tmp_path / "1"))
    assert not r.tracked and r.pages_dropped >= 4
    assert t.cmd("hash", hex(a + 4 * PAGE), 12)[0] == want_hi
    assert t.cmd("hash", hex(a), 3)[0] == want_lo


@pytest.mark.parametrize("kind", ["shared", "private"])
def test_restore_memory_of_a_mapping_longer_than_its_file(target, tmp_path, kind):
    """A file mapped over more pages than it has (zdtm's shmemfd-priv): the pages past its end cannot be read
    (SIGBUS) and are in no image; restore-memory rolls back the rest (before: 'cannot read', exit 1)."""
    f = tmp_path / "short"
    f.write_bytes(bytes((k * 5) & 0xFF for k in range(5 * PAGE)))
    a = target.addr("mapfile", f, 8, kind)
    target.cmd("poke", hex(a), "1,3")
    target.wait_idle()
    iteration.dump(target.pid, str(tmp_path / "1"), keep_tracking=True)
    before = target.read_mem(a, 5 * PAGE)
    target.cmd("poke", hex(a), "0,2,4")
    target.wait_idle()
    r = restore_memory(target.pid, str(tmp_path / "1"))
    assert r.pages_written + r.pages_dropped >= 3
    assert target.read_mem(a, 5 * PAGE) == before
    iteration.untrack(target.pid)
    r = restore_memory(target.pid, str(tmp_path / "1"))  # not tracked: the full compare
    assert target.read_mem(a, 5 * PAGE) == before
