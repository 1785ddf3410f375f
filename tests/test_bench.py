"""tools/bench runs end to end on a tiny target and produces its table and JSON (no timed assertions)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from conftest import require_kernel

BENCH = pathlib.Path(__file__).resolve().parent.parent / "tools" / "bench"
METHODS = {"wpdump", "full-copy", "hash-cmp", "limit"}


def test_bench_tiny(tmp_path):
    require_kernel()
    out = tmp_path / "out"
    p = subprocess.run(
        [sys.executable, str(BENCH), "--sizes", "16M", "--fractions", "1,100", "--reps", "1", "--fw-pages", "256",
         "--vmas", "2000", "--dir", str(tmp_path), "--out", str(out), "--no-plot"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "WPDUMP_RUN_DIR": str(tmp_path / "run")},
    )
    assert p.returncode == 0, p.stderr
    assert "| size | dirty | dirty MiB | method |" in p.stdout
    for name in ("| wpdump |", "| full-copy |", "| hash-cmp |", "| limit (read+write) |", "goals:"):
        assert name in p.stdout, name
    res = json.loads((out / "bench.json").read_text())
    assert [s["mib"] for s in res["sizes"]] == [16]
    rows = res["sizes"][0]["rows"]
    assert [r["fraction"] for r in rows] == [1.0, 100.0]
    for r in rows:
        assert METHODS <= set(r), r.keys()
        assert r["dirty_pages"] > 0
        w = r["wpdump"]
        assert w["n"] == 1 and w["total_s"] > 0 and w["samples"][0]["incremental"]
        # every page the target wrote was written by wpdump (plus a few of the helper's own: stack, stdio)
        assert w["pages_written"] >= r["dirty_pages"]
        assert r["hash-cmp"]["bytes"] >= r["dirty_bytes"]
    full = rows[0]["full-copy"]
    assert full["bytes"] >= 16 << 20
    assert "wpdump-running" in rows[0]
    assert res["sizes"][0]["rss_peak_kib"] > 0
    assert res["sizes"][0]["profile"]["profiled_s"] > 0
    assert res["firstwrite"]["pages"] == 256
    one, many = res["vmas"]["targets"]  # the many-VMAs row, against the same memory in one VMA
    assert many["vmas"] >= 2000 > one["vmas"] and one["incremental"] and many["incremental"]
    assert many["dump_frozen_s"] > 0 and "| VMAs | first pre-dump |" in p.stdout
    assert (out / "bench.md").read_text().startswith("wpdump benchmark")
    assert not [n for n in os.listdir(tmp_path) if n.startswith("wpdump-bench-")], "images left behind"
