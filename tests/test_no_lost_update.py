"""No lost update: writers race with get+reprotect (model: the kernel selftest transact_test)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import PAGE
from wpdump import ranges
from wpdump.target import uffd
from wpdump.tracking import tracker
from wpdump.tracking.tracker import Tracker

PAGES = 256
ROUNDS = 1000


def snapshot(pid: int, a: int) -> np.ndarray:
    buf = np.empty(PAGES * PAGE, dtype=np.uint8)
    assert uffd.read_ranges(pid, ranges.from_pairs([(a, a + PAGES * PAGE)]), buf) == len(buf)
    return buf.reshape(PAGES, PAGE)


def reported(h, a: int) -> np.ndarray:
    """Boolean per page of the region: in this harvest's copy ranges."""
    out = np.zeros(PAGES, dtype=bool)
    for s, e in ranges.clip(h.copy_ranges(), a, a + PAGES * PAGE):
        out[(int(s) - a) // PAGE : (int(e) - a) // PAGE] = True
    return out


@pytest.mark.parametrize(
    ("churn", "pause"), [(False, None), (True, None), (False, 0.0), (False, 20e-6)],
    ids=["steady", "layout-churn", "never-paused", "paused-in-pieces"],
)
def test_no_lost_update_with_four_writer_threads(target, churn, pause, monkeypatch):
    """With ``churn``, a fifth thread maps, replaces, remaps and unmaps memory throughout. The writers run: by
    default each harvest pauses them around its scan (freeze.Pause; here even though a scan this small is fast);
    "never-paused" scans with them running; "paused-in-pieces" scans 64 KiB pieces in 20 µs windows, each followed
    by as long unpaused."""
    rounds = ROUNDS // 2 if churn else ROUNDS // 5 if pause else ROUNDS
    monkeypatch.setattr(tracker, "_SLOWER", 0.0)  # pause whenever a thread runs, however fast the scan
    if pause:
        monkeypatch.setattr(tracker, "_PIECE", 16 * PAGE)
        monkeypatch.setattr(tracker, "_PROBE", 16 * PAGE)
    a = target.map(PAGES)
    target.cmd("fill", hex(a), PAGES, 7)
    stalls = 0
    with Tracker(target.pid, pause=pause) as tr:
        model = snapshot(target.pid, a).copy()  # read after the attach-time protect
        target.cmd("threads", 4, hex(a), PAGES)
        if churn:
            target.cmd("churn")
        prev_snap = model.copy()
        pending = np.zeros(PAGES, dtype=bool)
        changed_total = 0
        for _ in range(rounds):
            h = tr.harvest()
            stalls += len(h.stalls)
            rep = reported(h, a)
            # A page changed between the previous two snapshots was written after the previous
            # harvest: that harvest's successor (this one) must report it if the last one did not.
            assert not (pending & ~rep).any(), "a write was never reported"
            snap = snapshot(target.pid, a)  # read after the harvest, while the writers run
            changed = (snap != prev_snap).any(axis=1)
            changed_total += int(changed.sum())
            pending = changed & ~rep
            model[rep] = snap[rep]
            prev_snap = snap
        if churn:
            assert int(target.cmd("stopchurn")[0]) > 10
        writes = int(target.cmd("stopthreads")[0])
        h = tr.harvest()
        rep = reported(h, a)
        final = snapshot(target.pid, a)
        assert not (pending & ~rep).any(), "a write was never reported"
        model[rep] = final[rep]
    assert writes > rounds
    assert changed_total > rounds
    # the writers never sleep (state R): every harvest pauses them unless told not to
    assert (stalls == 0) if pause == 0.0 else (stalls >= rounds)
    bad = np.flatnonzero((model != final).any(axis=1))
    assert not len(bad), f"{len(bad)} pages differ, first at {a + int(bad[0]) * PAGE:#x}"



@pytest.mark.parametrize("pause", [None, 20e-6], ids=["one-window", "windows-and-gaps"])
def test_paused_scan_racing_writers_and_zaps_lose_no_update(target, pause, monkeypatch):
    """Harvests that pause the running writers (forced: every round), while writers and zaps (MADV_DONTNEED) race
    with them in the lower half; in the upper half a chunk is filled, then zapped before the next harvest (written,
    then empty: zero, never data). "windows-and-gaps": 64 KiB pieces in 20 µs windows, each followed by as long
    unpaused. An image kept from the harvests alone equals the memory byte for byte at the end."""
    pages, chunk, rounds = 1024, 64, 150
    monkeypatch.setattr(tracker, "_SLOWER", 0.0)  # pause whenever a thread runs, however fast the scan
    if pause:
        monkeypatch.setattr(tracker, "_PIECE", 16 * PAGE)
        monkeypatch.setattr(tracker, "_PROBE", 16 * PAGE)
    a = target.map(pages)
    half = pages // 2
    upper = a + half * PAGE
    stalls = zeroed = 0
    with Tracker(target.pid, pause=pause) as tr:
        model = np.zeros((pages, PAGE), dtype=np.uint8)  # the attach-time image: all zero
        target.cmd("threads", 4, hex(a), half)
        for i in range(rounds + 1):
            if i == rounds:
                target.cmd("stopthreads")
            else:
                target.cmd("madvise", hex(a + (i % (half // chunk)) * chunk * PAGE), chunk, "dontneed")
                up = upper + (i % (half // chunk)) * chunk * PAGE
                target.cmd("madvise", hex(up), chunk, "dontneed")  # filled a round ago: written, now empty
                nxt = upper + ((i + 1) % (half // chunk)) * chunk * PAGE
                target.cmd("fill", hex(nxt), chunk, i)
            h = tr.harvest()
            stalls += len(h.stalls)
            for s, e in ranges.clip(h.zero_ranges(), a, a + pages * PAGE).tolist():
                model[(s - a) // PAGE:(e - a) // PAGE] = 0
                zeroed += (min(e, a + pages * PAGE) - max(s, upper)) // PAGE if e > upper else 0
            for s, e in ranges.clip(h.copy_ranges(), a, a + pages * PAGE).tolist():
                rows = model[(s - a) // PAGE:(e - a) // PAGE]
                assert uffd.read_ranges(target.pid, ranges.from_pairs([(s, e)]), rows) == e - s
        final = np.empty((pages, PAGE), dtype=np.uint8)
        assert uffd.read_ranges(target.pid, ranges.from_pairs([(a, a + pages * PAGE)]), final) == final.size
    assert stalls >= rounds // 2, stalls  # the writers never sleep: nearly every harvest paused them
    assert zeroed >= (rounds - 1) * chunk, zeroed  # every zapped upper chunk came back as zero
    bad = np.flatnonzero((model != final).any(axis=1))
    assert not len(bad), f"{len(bad)} pages differ, first at {a + int(bad[0]) * PAGE:#x}"
