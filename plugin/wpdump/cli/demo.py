"""The demo: checkpoint the bundled workload while it writes (pre-dumps into CRIU image chains until
the convergence policy stops them, then the final dump with the workload frozen), then verify the
chain byte for byte against the workload's memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable

from .. import workloads
from ..chainops.verify import verify_process
from ..dump.checkpoint import checkpoint
from ..dump.convergence import PHaulPolicy
from ..dump.iteration import IterationResult
from ..errors import TrackerError
from .report import HEADER, row

MIB = 1 << 20


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


def run(mib: int = 64, rounds: int = 5, interval: float = 0.5, percent: float = 1.0, images_dir: str | None = None,
        out: Callable[[str], None] = print, keep: bool = False, json_out: bool = False) -> int:
    """Run the demo; returns the exit status (0 when the final image equals the workload's memory).

    The chain goes to ``images_dir`` (kept), else to a new temporary directory that is removed at the end
    unless ``keep``. With ``json_out`` every line is a JSON object (the iterations, then the verdict)."""
    def say(text: str, **record: object) -> None:
        if json_out:
            if record:
                out(json.dumps(record))
        else:
            out(text)

    proc, pid = start_workload(mib, percent)
    base = images_dir or tempfile.mkdtemp(prefix="wpdump-demo-")
    remove = images_dir is None and not keep
    try:
        say(f"demo workload: pid {pid}, {mib} MiB, {percent:g} % of its pages written every 100 ms")
        dest = os.path.join(base, "checkpoint") if images_dir is None else base
        say(f"wpdump checkpoint -t {pid} -D {dest} --max-iterations {rounds} --interval {interval:g} --leave-stopped")
        say(HEADER)
        count = [0]

        def on_iteration(r: IterationResult, reason: str | None) -> None:
            count[0] += 1
            say(row(count[0], r), **r.as_dict(), **({"stop_reason": reason} if reason else {}))
            if reason:
                say(f"     stop pre-dumping: {reason}")

        hist = checkpoint(pid, dest, PHaulPolicy(max_iterations=rounds), interval=interval, leave_stopped=True,
                          on_iteration=on_iteration)
        top = hist[-1].images_dir
        res = verify_process(pid, top)
        written = sum(r.bytes_written for r in hist)
        where = "removed at the end; --keep keeps it" if remove else f"inspect it: wpdump show -D {dest}"
        say(f"chain: {len(hist)} iterations in {dest}, {written / MIB:.1f} MiB written in all ({where})")
        if res.ok:
            say(f"verified: the final dump is identical to the frozen workload's memory ({res.summary()})",
                verified=True, images_dir=None if remove else dest, iterations=len(hist), bytes_written=written,
                summary=res.summary())
            return 0
        say(f"MISMATCH: {res.summary()}", verified=False, images_dir=None if remove else dest,
            iterations=len(hist), bytes_written=written, summary=res.summary(), first=[str(m) for m in res.first])
        for m in res.first:
            say(f"    {m}")
        return 1
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if remove:
            shutil.rmtree(base, ignore_errors=True)
