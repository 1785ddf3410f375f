"""Pre-dump iterations and the final dump of a real process, checked page by page against its memory."""

from __future__ import annotations

import os
import signal
import time

import pycriu.images
import pytest
from chaincheck import PE_PARENT, PE_PRESENT, compare_with_memory, load_pagemap, reconstruct
from wpdump.dump import iteration
from wpdump.images import chain
from wpdump.images.imgdir import ImageDirError
from wpdump.tracking import keeper

PAGE = 4096


def entries_pages(d: str, pid: int, flag: int) -> set[int]:
    _, entries = load_pagemap(d, pid)
    return {p for e in entries if e["flags"] & flag for p in range(e["vaddr"], e["vaddr"] + e["nr_pages"] * PAGE, PAGE)}


def stop_and_wait(pid: int) -> None:
    for _ in range(1000):
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.001)
    raise AssertionError("target did not stop")


def test_chain_of_iterations_equals_memory(target, tmp_path):
    t = target
    a = t.map(256)
    t.cmd("fill", hex(a), 128, 1)
    b = t.map(64)
    t.cmd("fill", hex(b), 64, 2)
    c = t.map(32)
    t.cmd("fill", hex(c), 32, 3)
    d = tmp_path / "img"
    d.mkdir()

    r1 = iteration.pre_dump(t.pid, str(d / "1"))
    assert not r1.incremental and r1.pages_parent == 0
    assert r1.pages_written >= 128 + 64 + 32
    assert keeper.tracked_pids() == [t.pid]
    assert entries_pages(str(d / "1"), t.pid, PE_PARENT) == set()

    # 2: ten pages change; everything else comes from the parent
    t.cmd("poke", hex(a), ",".join(str(i) for i in range(0, 100, 10)))
    r2 = iteration.pre_dump(t.pid, str(d / "2"), "../1")
    assert r2.incremental and not r2.warnings
    present2 = entries_pages(str(d / "2"), t.pid, PE_PRESENT)
    assert {a + i * PAGE for i in range(0, 100, 10)} <= present2
    assert len(present2) <= 10 + 24, f"{len(present2)} pages written for 10 changed"  # + stack, stdio
    assert r2.pages_parent >= 128 + 64 + 32 - 10
    assert os.readlink(d / "2" / "parent") == "../1"

    # 3: zap pages, new mapping, mremap (moved), munmap, grown heap, writes from threads
    t.cmd("madvise", hex(a + 4 * PAGE), 4, "dontneed")
    n = t.map(16)
    t.cmd("fill", hex(n), 16, 4)
    moved = t.addr("mremap", hex(b), 64, 64, hex(a + 300 * PAGE + 0x10000000))
    t.cmd("munmap", hex(c), 32)
    old_brk = t.addr("brk", 8)
    t.cmd("fill", hex(old_brk), 8, 5)
    w = t.map(64)
    t.cmd("threads", 2, hex(w), 64)
    time.sleep(0.05)
    t.cmd("stopthreads")
    r3 = iteration.pre_dump(t.pid, str(d / "3"), "../2")
    assert r3.incremental
    zapped = {a + i * PAGE for i in range(4, 8)}
    listed3 = entries_pages(str(d / "3"), t.pid, PE_PRESENT | PE_PARENT)
    assert not zapped & listed3, "zapped pages must be absent"
    assert {n + i * PAGE for i in range(16)} <= entries_pages(str(d / "3"), t.pid, PE_PRESENT)
    assert {moved + i * PAGE for i in range(64)} <= listed3
    assert not {c + i * PAGE for i in range(32)} & listed3

    # 4: the final dump, left stopped, equals the process's memory in every page
    t.cmd("poke", hex(a), "1,2,3")
    r4 = iteration.dump(t.pid, str(d / "4"), "../3", leave_stopped=True)
    try:
        stop_and_wait(t.pid)
        assert r4.kind == "dump" and r4.incremental and r4.frozen_s > 0
        assert compare_with_memory(str(d / "4"), t.pid) > 500
        # every iteration of the chain reconstructs, and each was an image of the process then
        image, depth = reconstruct(str(d / "4"), t.pid)
        assert max(depth.values()) == 3  # some pages still come from the first iteration
        assert keeper.tracked_pids() == []  # the final dump ended tracking
        stats = chain.load_iteration(str(d / "4"), t.pid)
        assert stats.meta["kind"] == "dump"
    finally:
        os.kill(t.pid, signal.SIGCONT)
    t.cmd("poke", hex(a), "9")  # the target runs on normally


def test_every_image_is_readable_by_pycriu(target, tmp_path):
    a = target.map(64)
    target.cmd("fill", hex(a), 64, 7)
    iteration.pre_dump(target.pid, str(tmp_path / "1"))
    target.cmd("poke", hex(a), "5")
    iteration.dump(target.pid, str(tmp_path / "2"), "../1")
    for d in ("1", "2"):
        names = sorted(os.listdir(tmp_path / d))
        assert {"inventory.img", f"pagemap-{target.pid}.img", "pages-1.img", "stats-dump"} <= set(names)
        for name in names:
            if name.endswith(".img") and not name.startswith("pages-") or name == "stats-dump":
                with open(tmp_path / d / name, "rb") as f:
                    img = pycriu.images.load(f)
                assert img["entries"], name
            st = os.lstat(tmp_path / d / name)
            if name != "parent":
                assert st.st_mode & 0o777 == 0o600, name  # process memory: owner only
    with open(tmp_path / "2" / "inventory.img", "rb") as f:
        inv = pycriu.images.load(f)["entries"][0]
    assert inv["dump_uptime"] > 0
    with open(tmp_path / "2" / "stats-dump", "rb") as f:
        st = pycriu.images.load(f)["entries"][0]["dump"]
    assert st["pages_written"] >= 1 and st["pages_skipped_parent"] >= 60 and st["frozen_time"] > 0


def uffd_holders() -> list[str]:
    """Processes holding a userfaultfd (pid and command line), to name a leaked reference."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[userfaultfd]" for fd in fds):
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    out.append(f"{pid} {f.read().replace(bytes(1), b' ').decode(errors='replace')[:120]}")
        except OSError:
            continue
    return out


def test_tracking_survives_between_invocations_and_untrack_ends_it(target, tmp_path):
    a = target.map(32)
    target.cmd("fill", hex(a), 32, 1)
    iteration.pre_dump(target.pid, str(tmp_path / "1"))
    [st] = iteration.status()
    assert st["pid"] == target.pid and st["images_dir"] == str(tmp_path / "1")
    target.cmd("poke", hex(a), "7")
    r = iteration.pre_dump(target.pid, str(tmp_path / "2"), "../1")
    assert r.incremental and r.pages_written < 32
    assert iteration.untrack(target.pid)
    assert iteration.status() == []
    assert not registered(target.pid), f"registration left; userfaultfd holders: {uffd_holders()}"
    target.cmd("poke", hex(a), "8")
    r = pre_dump_stopped(target.pid, tmp_path / "3", "../2")
    assert not r.incremental and r.warnings  # tracking was ended: a full iteration, with a warning


def registered(pid: int) -> list[str]:
    """The VMAs of ``pid`` registered with a userfaultfd for write-protection ("uw" in smaps)."""
    with open(f"/proc/{pid}/smaps") as f:
        return [line for line in f if line.startswith("VmFlags:") and " uw" in line]


def test_untrack_returns_once_no_registration_is_left(target, tmp_path):
    """untrack waits for the keeper's end; the keeper closed its connections (Python closes a dropped socket)
    before its userfaultfds, so a writing target was seen still registered after untrack (1 round in 4, and a
    new tracker then refused it as tracked by another)."""
    a = target.map(8192)
    target.cmd("fill", hex(a), 8192, 3)
    target.cmd("threads", 1, hex(a), 8192)  # the write-protection's release competes with the writer
    try:
        for i in range(40):
            iteration.pre_dump(target.pid, str(tmp_path / str(i)))
            assert iteration.untrack(target.pid)
            assert not registered(target.pid), f"round {i}: registration left; holders: {uffd_holders()}"
    finally:
        target.cmd("stopthreads")


def pre_dump_stopped(pid: int, d, prev: str | None) -> iteration.IterationResult:
    """A pre-dump of a stopped target, compared with its memory before it runs on. (Stopping it after
    the pre-dump would not do: stopping a thread in nanosleep makes the kernel write the remaining time.)"""
    os.kill(pid, signal.SIGSTOP)
    try:
        stop_and_wait(pid)
        r = iteration.pre_dump(pid, str(d), prev)
        compare_with_memory(str(d), pid)
    finally:
        os.kill(pid, signal.SIGCONT)
    return r


@pytest.mark.parametrize("loss", ["keeper killed", "target exec"])
def test_lost_tracking_gives_a_full_iteration(target, tmp_path, loss):
    a = target.map(32)
    target.cmd("fill", hex(a), 32, 1)
    iteration.pre_dump(target.pid, str(tmp_path / "1"))
    if loss == "keeper killed":
        [st] = iteration.status()
        os.kill(st["keeper"], signal.SIGKILL)
        time.sleep(0.05)
        target.cmd("poke", hex(a), "3")
    else:
        target.cmd("exec")  # the target becomes /bin/sleep: same pid, same start time, a new mm
        for _ in range(200):
            if os.readlink(f"/proc/{target.pid}/exe") == "/usr/bin/sleep":
                break
            time.sleep(0.005)
    r = pre_dump_stopped(target.pid, tmp_path / "2", "../1")
    assert not r.incremental and r.warnings, r
    assert r.pages_parent == 0
    assert entries_pages(str(tmp_path / "2"), target.pid, PE_PARENT) == set()
    # tracking goes on from this full iteration
    if loss == "keeper killed":
        target.cmd("poke", hex(a), "4")
    r = pre_dump_stopped(target.pid, tmp_path / "3", "../2")
    assert r.incremental and not r.warnings


def test_keeper_hands_its_trackers_out_only_since_the_parent(target, tmp_path):
    """The checkout names the parent (one round trip, no status first): a keeper that tracked since another
    iteration refuses it, keeps its trackers and stays free; since the parent it hands them out."""
    a = target.map(8)
    target.cmd("fill", hex(a), 8, 1)
    r1 = iteration.pre_dump(target.pid, str(tmp_path / "1"))
    k = keeper.Keeper.connect(target.pid)
    try:
        reply, members = k.checkout_since("not-" + r1.iteration)
        assert members is None and reply["iteration"] == r1.iteration and reply["images_dir"] == str(tmp_path / "1")
        assert not k.status()["busy"]
        reply, members = k.checkout_since(r1.iteration)
        assert members is not None and len(members) == 1 and members[0].pid == target.pid and k.status()["busy"]
        for m in members:
            os.close(m.uffd)
        k.giveback()
    finally:
        k.close()
    target.cmd("poke", hex(a), "1")  # page 1 of the eight
    r2 = pre_dump_stopped(target.pid, tmp_path / "2", "../1")  # tracking went on
    assert r2.incremental and not r2.warnings
    present = entries_pages(str(tmp_path / "2"), target.pid, PE_PRESENT)
    assert a + PAGE in present and a not in present and a in entries_pages(str(tmp_path / "2"), target.pid, PE_PARENT)
    target.cmd("poke", hex(a), "0")
    r3 = pre_dump_stopped(target.pid, tmp_path / "3", "../1")  # not the parent the keeper tracked since
    assert not r3.incremental and r3.pages_parent == 0
    assert [w for w in r3.warnings if f"tracked since {tmp_path / '2'}, not since the parent" in w], r3.warnings


def test_a_commit_failing_after_the_checkin_ends_tracking(target, tmp_path):
    """The trackers are sent to the keeper before the commit (it takes them while the files are synced); when the
    commit then fails (here: the destination filled meanwhile, rename refused), tracking ends as for any failure
    after a harvest, and the next iteration is full."""
    a = target.map(64)
    target.cmd("fill", hex(a), 64, 1)
    iteration.pre_dump(target.pid, str(tmp_path / "1"))
    target.cmd("poke", hex(a), "3")
    dest = tmp_path / "2"

    def intrude(done: int, total: int) -> None:
        if not dest.exists():
            dest.mkdir()
            (dest / "someone-elses").write_text("x")

    with pytest.raises(ImageDirError, match="exists and is not empty"):
        iteration.pre_dump(target.pid, str(dest), "../1", progress=intrude)
    assert iteration.status() == [] and keeper.tracked_pids() == []
    assert not registered(target.pid), f"registration left; userfaultfd holders: {uffd_holders()}"
    r = pre_dump_stopped(target.pid, tmp_path / "3", "../1")
    assert not r.incremental and r.warnings


def test_a_keeper_dying_during_the_copy_ends_tracking_after_a_complete_iteration(target, tmp_path):
    """The keeper is killed while the pages are copied: the trackers cannot be sent back before the commit, the
    iteration is complete all the same and says tracking ended, nothing stays registered, the next one is full."""
    a = target.map(1024)
    target.cmd("fill", hex(a), 1024, 1)
    iteration.pre_dump(target.pid, str(tmp_path / "1"))
    [st] = iteration.status()
    target.cmd("fill", hex(a), 1024, 2)
    killed = []

    def kill_keeper(done: int, total: int) -> None:
        if not killed:
            os.kill(st["keeper"], signal.SIGKILL)
            killed.append(True)
            for _ in range(2000):  # until it is gone (its socket closed with it)
                if not os.path.exists(f"/proc/{st['keeper']}"):
                    break
                time.sleep(0.001)

    r = iteration.pre_dump(target.pid, str(tmp_path / "2"), "../1", progress=kill_keeper)
    assert killed and r.incremental
    assert [w for w in r.warnings if "tracking of pid" in w and "ends" in w], r.warnings
    chain.load_chain(str(tmp_path / "2"), target.pid)
    assert iteration.status() == []
    assert not registered(target.pid), f"registration left; userfaultfd holders: {uffd_holders()}"
    r = pre_dump_stopped(target.pid, tmp_path / "3", "../2")
    assert not r.incremental and r.warnings
