"""The page copy/write path of an iteration (pages.copy_and_write): batches, reader threads, the writer
thread (both kept for the process's life) with O_DIRECT, small copies in the caller's thread, zero pages left
out, ranges that vanished skipped; the file holds exactly the pages."""

from __future__ import annotations

import fcntl
import os

import numpy as np
import pytest
from conftest import unavailable
from wpdump import ranges
from wpdump.dump import pages
from wpdump.target import memory

PAGE = 4096


def test_batches_are_exact():
    rng = np.random.default_rng(5)
    pages = np.sort(rng.choice(1 << 16, 3000, replace=False)).astype(np.uint64)
    r = ranges.merge(np.column_stack((pages * PAGE, (pages + rng.integers(1, 40, len(pages))) * PAGE)))
    r = np.concatenate((r, [[r[-1, 1] + PAGE, r[-1, 1] + 1000 * PAGE]])).astype(np.uint64)  # one long range
    for limit in (PAGE, 8 * PAGE, 64 * PAGE, 1 << 20):
        batches = ranges.batches(r, limit)
        assert all(ranges.total(b) <= limit for b in batches)
        assert np.array_equal(ranges.merge(np.concatenate(batches)), ranges.merge(r))
        # greedy: a batch ends only where the next range would not fit
        for b, nxt in zip(batches, batches[1:], strict=False):
            assert ranges.total(b) + int(nxt[0, 1] - nxt[0, 0]) > limit
    assert ranges.batches(ranges.EMPTY, PAGE) == []


@pytest.mark.parametrize("how", ["single", "aio", "aio2", "thread", "threads"])
def test_copy_and_write(target, tmp_path, monkeypatch, how):
    """single: one batch, read then written; aio(2): batches read by this thread (and a helper reading every other
    one), written with Linux AIO; thread(s): batches written by the writer thread, read by this thread or two
    reader threads."""
    monkeypatch.setattr(pages, "SINGLE_BYTES", 1 << 30 if how == "single" else 0)
    monkeypatch.setattr(pages, "USE_AIO", how.startswith("aio"))
    readers = 2 if how in ("threads", "aio2") else 1
    monkeypatch.setattr(pages, "READERS", readers)
    monkeypatch.setattr(pages, "BUFFERS", readers + 2)
    monkeypatch.setattr(pages, "BATCH_BYTES", 8 * PAGE)  # many batches, every buffer reused
    monkeypatch.setattr(pages, "MIN_BATCH_BYTES", 8 * PAGE)
    monkeypatch.setattr(pages, "FIRST_BATCH_BYTES", 2 * PAGE)  # batches of 2, 4, then 8 pages
    t = target
    a = t.map(64)
    t.cmd("fill", hex(a), 64, 3)
    t.cmd("madvise", hex(a + 10 * PAGE), 3, "dontneed")  # reads zero: left out (anonymous)
    t.cmd("madvise", hex(a + 30 * PAGE), 16, "dontneed")  # two whole batches of zero pages: nothing to write
    c = t.map(24)
    t.cmd("fill", hex(c), 24, 4)
    t.cmd("munmap", hex(c + 8 * PAGE), 8)  # vanished after the harvest: its neighbours are still read
    copy = ranges.merge(ranges.from_pairs([(a, a + 64 * PAGE), (c, c + 24 * PAGE)]))
    anon = copy
    path = tmp_path / "pages.img"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    seen = []
    try:
        written, zeros, copy_s, write_s = pages.copy_and_write(
            t.pid, copy, anon, fd, str(path), lambda done, total: seen.append((done, total))
        )
        assert not os.O_DIRECT & fcntl.fcntl(fd, fcntl.F_GETFL), "O_DIRECT left on"
    finally:
        os.close(fd)
    want = ranges.from_pairs([(a, a + 10 * PAGE), (a + 13 * PAGE, a + 30 * PAGE), (a + 46 * PAGE, a + 64 * PAGE),
                              (c, c + 8 * PAGE), (c + 16 * PAGE, c + 24 * PAGE)])
    assert np.array_equal(written, ranges.merge(want))
    assert copy_s >= 0 and write_s >= 0
    assert seen and seen[-1][0] == seen[-1][1] == ranges.total(copy)
    assert zeros == 3 + 16
    data = path.read_bytes()
    assert data == b"".join(t.read_mem(int(s), int(e - s)) for s, e in written)


def test_copy_and_write_nothing(tmp_path):
    fd = os.open(tmp_path / "p", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        written, zeros, _, _ = pages.copy_and_write(os.getpid(), ranges.EMPTY, ranges.EMPTY, fd, "p", None)
    finally:
        os.close(fd)
    assert len(written) == 0 and zeros == 0 and os.path.getsize(tmp_path / "p") == 0


def test_reader_skips_only_the_hole(target):
    t = target
    c = t.map(40)
    t.cmd("fill", hex(c), 40, 5)
    t.cmd("munmap", hex(c + 10 * PAGE), 5)
    t.cmd("munmap", hex(c + 30 * PAGE), 1)
    r = ranges.from_pairs([(c, c + 40 * PAGE)])
    out = np.zeros(40 * PAGE, dtype=np.uint8)
    with memory.Reader(t.pid) as reader:
        ok = reader.read_into(r, out)
    addrs = ranges.page_addrs(r)
    lost = ranges.from_pages(addrs[~ok])
    assert np.array_equal(lost, ranges.from_pairs([(c + 10 * PAGE, c + 15 * PAGE), (c + 30 * PAGE, c + 31 * PAGE)]))
    rows = out.reshape(-1, PAGE)[ok]
    assert len(rows) == 34
    for addr, row in zip(addrs[ok].tolist(), rows, strict=True):
        assert row.tobytes() == t.read_mem(addr, PAGE)



def test_aio_write_refused_by_o_direct_is_written_plainly(tmp_path):
    """An O_DIRECT write the kernel refuses (here: a buffer one byte off alignment) is written again without
    O_DIRECT at its offset, and its buffer slot handed back, whether io_submit or the completion says EINVAL."""
    path = tmp_path / "pages.img"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    ctx, own = None, False
    try:
        job = pages._Job(fd, str(path))
        if not job.direct:
            unavailable(f"the filesystem of {tmp_path} lacks O_DIRECT")
        ctx, own = pages._aio_context(False)
        assert ctx is not None
        aio = pages._Aio(ctx, job)
        buf = memory.aligned_buffer(4 * PAGE)
        buf[:] = np.arange(len(buf), dtype=np.uint64).astype(np.uint8)
        odd = buf[1:]
        assert aio.submit(3, odd, np.array([[0, 2 * PAGE]], dtype=np.int64), 0) == 2 * PAGE
        slots = []
        while aio.todo or aio.freed:
            slots += aio.reap(True)
        assert slots == [3] and aio.error is None and not job.direct
        job.close()
    finally:
        if own:
            pages.lib.wpd_aio_destroy(ctx)
        os.close(fd)
    assert path.read_bytes() == odd[: 2 * PAGE].tobytes()


def test_a_copy_that_fails_midway_leaves_no_write_behind(target, tmp_path, monkeypatch):
    """A failure (here raised by the progress callback, as an interrupt would be) while writes are in flight: the
    copy raises at once, its AIO context is destroyed (which waits for every write in flight), and the next copy
    writes exactly its own pages."""
    monkeypatch.setattr(pages, "BATCH_BYTES", 8 * PAGE)
    monkeypatch.setattr(pages, "MIN_BATCH_BYTES", 8 * PAGE)
    monkeypatch.setattr(pages, "FIRST_BATCH_BYTES", 8 * PAGE)
    monkeypatch.setattr(pages, "SINGLE_BYTES", 0)
    a = target.map(256)
    target.cmd("fill", hex(a), 256, 9)
    copy = ranges.from_pairs([(a, a + 256 * PAGE)])

    class Stop(Exception):
        pass

    def stop(done: int, total: int) -> None:
        raise Stop

    fd = os.open(tmp_path / "failed", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with pytest.raises(Stop):
            pages.copy_and_write(target.pid, copy, copy, fd, "failed", stop)
    finally:
        os.close(fd)
    path = tmp_path / "pages.img"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        written, _, _, _ = pages.copy_and_write(target.pid, copy, copy, fd, str(path), None)
    finally:
        os.close(fd)
    assert np.array_equal(written, copy)
    assert path.read_bytes() == target.read_mem(a, 256 * PAGE)
