"""The demo: track the bundled workload for a few rounds, copy its dirty pages into a model image,
then freeze it and verify the image byte for byte against its memory."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

from . import freeze, workloads
from .errors import TrackerError
from .image import CopyBuffer, PageImage, copy_pages, verify
from .tracker import Harvest, Tracker

MIB = 1 << 20
HEADER = f"{'round':>7} {'dirty pages':>12} {'zeroed':>7} {'MiB to copy':>12} {'harvest ms':>11} {'copy ms':>8} events"


def start_workload(mib: int, percent: float = 1.0) -> tuple[subprocess.Popen, int]:
    """Build and start the demo workload; returns the process and its pid once it is ready."""
    exe = workloads.build("demo")
    proc = subprocess.Popen([str(exe), str(mib), str(percent)], stdout=subprocess.PIPE, text=True)
    words = proc.stdout.readline().split()
    if len(words) != 2 or words[0] != "ready":
        proc.kill()
        proc.wait()
        raise TrackerError(f"demo workload did not start (said {' '.join(words) or 'nothing'})")
    return proc, int(words[1])


def _row(label: str, h: Harvest, copy_s: float) -> str:
    pages = h.copy_bytes // 4096
    zeroed = sum(int((v.zero[:, 1] - v.zero[:, 0]).sum()) for v in h.vmas if len(v.zero)) // 4096
    return (
        f"{label:>7} {pages:>12} {zeroed:>7} {h.copy_bytes / MIB:>12.2f} {h.seconds * 1e3:>11.2f} "
        f"{copy_s * 1e3:>8.2f} {len(h.events)}"
    )


def run(mib: int = 64, rounds: int = 5, interval: float = 1.0, percent: float = 1.0,
        out: Callable[[str], None] = print) -> int:
    """Run the demo; returns the exit status (0 when the image is identical to the target's memory)."""
    proc, pid = start_workload(mib, percent)
    try:
        out(f"demo workload: pid {pid}, {mib} MiB, {percent:g} % of its pages written every 100 ms")
        image, buf = PageImage(), CopyBuffer()

        def step(label: str, h: Harvest) -> Harvest:
            t0 = time.perf_counter()
            copied = copy_pages(pid, h.copy_ranges(), buf)
            copy_s = time.perf_counter() - t0
            image.apply(h, copied)
            out(_row(label, h, copy_s))
            for e in h.events:
                out(f"{'':>9}{e}")
            return h

        with Tracker(pid) as tr:
            out(HEADER)
            step("attach", tr.initial)
            for r in range(1, rounds + 1):
                time.sleep(interval)
                step(str(r), tr.harvest())
            stop_s = freeze.stop(pid)
            final = step("frozen", tr.harvest())
            verdict = verify(pid, image, final)
        out(f"froze the workload with SIGSTOP in {stop_s * 1e3:.2f} ms; model image: {len(image)} pages "
            f"({len(image) * 4096 / MIB:.1f} MiB)")
        if verdict.identical:
            out(f"verified {verdict.pages} pages: identical "
                f"(and {verdict.zero_checked} untouched anonymous pages read zero)")
            return 0
        if len(verdict.mismatched):
            shown = ", ".join(f"{int(a):#x}" for a in verdict.mismatched[:8])
            out(f"MISMATCH: {len(verdict.mismatched)} of {verdict.pages} pages differ: {shown}")
        if len(verdict.nonzero):
            shown = ", ".join(f"{int(a):#x}" for a in verdict.nonzero[:8])
            out(f"MISMATCH: {len(verdict.nonzero)} pages missing from the image are not zero: {shown}")
        return 1
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
