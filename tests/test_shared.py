"""Shared memory: writes through another mapping are invisible to write-protect (docs/kernel.md rule 7),
so shared mappings are reported whole, by the data their object holds."""

from __future__ import annotations

import os

from conftest import PAGE, copied_pages
from wpdump.target.vmas import Policy
from wpdump.tracking.tracker import Tracker


def test_shared_anon_written_by_another_process_is_reported(target):
    a = target.map(32, "shared")
    target.cmd("fill", hex(a), 8, 5)  # pages 0-7 hold data, 8-31 are holes of the shmem object
    with Tracker(target.pid) as tr:
        pol = {v.start: p for v, p, _ in tr.policies()}
        assert pol[a] is Policy.WHOLE
        assert copied_pages(tr.initial, a, a + 32 * PAGE) == {a + i * PAGE for i in range(8)}
        # write page 20 through another mapping of the same object: our own process's
        fd = os.open(f"/proc/{target.pid}/map_files/{a:x}-{a + 32 * PAGE:x}", os.O_RDWR)
        try:
            os.pwrite(fd, b"\x42" * PAGE, 20 * PAGE)
        finally:
            os.close(fd)
        h = tr.harvest()
        got = copied_pages(h, a, a + 32 * PAGE)
        assert a + 20 * PAGE in got
        assert {a + i * PAGE for i in range(8)} <= got
        assert target.read_mem(a + 20 * PAGE, PAGE) == b"\x42" * PAGE
