"""A tracker that dies leaves the target running normally and unprotected (docs/kernel.md rule 10)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

ATTACH = """
import sys, time
from wpdump.tracking.tracker import Tracker
tr = Tracker(int(sys.argv[1]))
print("attached", flush=True)
time.sleep(600)
"""


def uw_vmas(pid: int) -> int:
    with open(f"/proc/{pid}/smaps") as f:
        return sum(1 for line in f if line.startswith("VmFlags:") and " uw" in line)


def test_sigkilled_tracker_leaves_target_unprotected(target):
    a = target.map(64)
    target.cmd("fill", hex(a), 64, 3)
    assert uw_vmas(target.pid) == 0
    tool = subprocess.Popen([sys.executable, "-c", ATTACH, str(target.pid)], stdout=subprocess.PIPE, text=True)
    try:
        assert tool.stdout.readline().strip() == "attached"
        assert "uw" in target.smaps_flags(a)
        assert uw_vmas(target.pid) > 5
        target.cmd("threads", 2, hex(a), 64)
    finally:
        tool.send_signal(signal.SIGKILL)
        tool.wait()
    assert uw_vmas(target.pid) == 0
    before = int(target.cmd("writes")[0])
    target.cmd("poke", hex(a), "1,2,3")
    target.cmd("fill", hex(a), 64, 4)
    for _ in range(200):  # the writer threads go on writing
        if int(target.cmd("writes")[0]) > before:
            break
        time.sleep(0.01)
    assert int(target.cmd("stopthreads")[0]) > before
    # the writer threads own the first 16 bytes of each page; the rest is the fill pattern
    expected = bytes((4 * 131 + 9 * 7 + k * 13 + (k >> 8)) & 0xFF for k in range(64, 4096))
    assert target.read_mem(a + 9 * 4096 + 64, 4096 - 64) == expected


def test_close_unprotects(target):
    from wpdump.tracking.tracker import Tracker

    a = target.map(16)
    with Tracker(target.pid):
        assert "uw" in target.smaps_flags(a)
    assert uw_vmas(target.pid) == 0
    target.cmd("fill", hex(a), 16, 1)
    assert target.alive()
