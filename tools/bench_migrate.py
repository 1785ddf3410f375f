"""``tools/bench migrate``: CRIU-only migration against wpdump pre-copy, side by side, on two network namespaces
joined by a veth pair limited to 1 Gbit/s (tbf). Prints a table; asserts nothing but that each restored copy
passes its self-check.

CRIU-only: ``criu dump --leave-stopped`` -> send every image (the same wire and receiver as wpdump's) ->
``criu restore`` on the destination; the whole of it is downtime. wpdump: ``wpdump migrate`` (pre-dumps while
the workload runs, then the lazy final dump). The workload (tests/targets/selfcheck.c) is its own pid namespace's
init and rewrites 1 % of its pages per second (by default).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the test hosts (tests/netns.py)
from netns import Hosts  # noqa: E402

BIN = pathlib.Path(sys.executable).parent
WPDUMP = BIN / "wpdump"
PORT = 7070


class Workload:
    def __init__(self, hosts: Hosts, exe: pathlib.Path, work: pathlib.Path, mib: int, per_tick: int) -> None:
        self.result = work / f"result-{secrets.token_hex(3)}"
        self.proc = subprocess.Popen(
            hosts.run(hosts.src, "unshare", "--pid", "--fork", "setsid", exe, mib, self.result, per_tick),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.wait_line("ready", 0, 600)
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
            [self.pid] = [int(x) for x in f.read().split()]

    def lines(self) -> list[str]:
        return self.result.read_text().splitlines() if self.result.exists() else []

    def wait_line(self, prefix: str, after: int, timeout: float) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for ln in self.lines()[after:]:
                if ln.startswith((prefix, "FAIL")):
                    return ln
            time.sleep(0.05)
        raise RuntimeError(f"no {prefix!r} from the workload")

    def check(self, pid: int) -> str:
        n = len(self.lines())
        os.kill(pid, signal.SIGUSR1)
        return self.wait_line("ok", n, 600)

    def stop(self) -> None:
        with contextlib_suppress():
            os.kill(self.pid, signal.SIGKILL)
        with contextlib_suppress():
            self.proc.wait(timeout=60)


def contextlib_suppress():
    import contextlib

    return contextlib.suppress(OSError, subprocess.TimeoutExpired)


def serve(hosts: Hosts, dest: pathlib.Path) -> subprocess.Popen:
    dest.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen(hosts.run(hosts.dst, WPDUMP, "serve", "-D", dest, "--address", hosts.dst_ip, "--port", PORT,
                                   "--once"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if "listening" not in p.stdout.readline():
        raise RuntimeError(f"wpdump serve did not start: {p.stderr.read()}")
    return p


CRIU_ONLY = """
import json, os, sys, tempfile, time
from wpdump.migrate import pageserver as ps, protocol as wp, source, tree
pid, address, port, work = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
local = tempfile.mkdtemp(dir=work)
final = os.path.join(local, "1")
os.mkdir(final)
sk = source.connect(address, port, 600)
t0 = time.perf_counter()
dump_s, _ = source.criu_dump(pid, final, os.path.join(local, "dump.log"), None)
s = source.send_iteration(sk, final, 1, final=True)
ps.send_iov(sk, wp.WP_RESTORE)
answer = json.loads(wp.recv_reply(sk, "RESTORE"))
t1 = time.perf_counter()
tree.kill(pid)
print(json.dumps({"restored_pid": answer["pid"], "total_s": t1 - t0, "downtime_s": t1 - t0, "bytes": s.bytes,
                  "criu_dump_s": dump_s, "rewrite_s": 0.0, "transfer_s": s.send_s, "restore_s": answer["restore_s"],
                  "iterations": 1}))
"""


def run_one(method: str, hosts: Hosts, exe: pathlib.Path, work: pathlib.Path, mib: int, dirty: float,
            max_iterations: int) -> dict:
    pages = mib * 256
    per_tick = max(1, round(pages * dirty / 100 / 100))  # selfcheck ticks every 10 ms
    print(f"bench migrate: {method}, {mib} MiB, {per_tick * 100} pages/s written", file=sys.stderr, flush=True)
    w = Workload(hosts, exe, work, mib, per_tick)
    srv = serve(hosts, work / f"dst-{method}-{mib}")
    try:
        time.sleep(1.0)  # let it write a while: the first pre-dump sees a running workload
        if method == "criu":
            cmd = hosts.run(hosts.src, sys.executable, "-c", CRIU_ONLY, w.pid, hosts.dst_ip, PORT, work)
        else:
            cmd = hosts.run(hosts.src, WPDUMP, "migrate", "-t", w.pid, "--address", hosts.dst_ip, "--port", PORT,
                            "--max-iterations", max_iterations, "--json", "--work-dir", work)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if p.returncode != 0:
            raise RuntimeError(f"{method} migration failed: {p.stderr.strip()}")
        res = json.loads(p.stdout.strip().splitlines()[-1])
        srv.wait(timeout=600)
        w.proc.wait(timeout=120)
        new = int(res["restored_pid"])
        res["self_check"] = w.check(new)
        os.kill(new, signal.SIGKILL)
        per = res.get("iterations")
        if isinstance(per, list):
            res["iterations"] = len(per)
        return {"method": method, "mib": mib, **{k: res[k] for k in (
            "total_s", "bytes", "downtime_s", "criu_dump_s", "rewrite_s", "transfer_s", "restore_s", "iterations",
            "self_check")}, "per_iteration": per if isinstance(per, list) else [], "final": res.get("hook", ""),
            "stop_reason": res.get("stop_reason", "")}
    finally:
        if srv.poll() is None:
            srv.kill()
        w.stop()
        shutil.rmtree(work / f"dst-{method}-{mib}", ignore_errors=True)


def table(rows: list[dict]) -> str:
    head = ("| size | method | iterations | total s | MiB sent | downtime ms | criu dump | rewrite | transfer | "
            "restore |\n|---|---|---|---|---|---|---|---|---|---|")
    out = [head]
    for r in rows:
        out.append(f"| {r['mib'] // 1024 if r['mib'] >= 1024 else r['mib']} {'GiB' if r['mib'] >= 1024 else 'MiB'} "
                   f"| {r['method']} | {r['iterations']} | {r['total_s']:.1f} | {r['bytes'] / 2**20:.0f} | "
                   f"{r['downtime_s'] * 1e3:.0f} | {r['criu_dump_s'] * 1e3:.0f} | {r['rewrite_s'] * 1e3:.0f} | "
                   f"{r['transfer_s'] * 1e3:.0f} | {r['restore_s'] * 1e3:.0f} |")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench migrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1024,4096", help="workload sizes in MiB (1024,4096)")
    p.add_argument("--dirty", type=float, default=1.0, help="%% of the pages written per second (1)")
    p.add_argument("--rate", default="1gbit", help="link rate for tc tbf (1gbit)")
    p.add_argument("--max-iterations", type=int, default=5, help="wpdump's pre-dumps at most (5)")
    p.add_argument("--methods", default="criu,wpdump", help="criu,wpdump")
    p.add_argument("--dir", default="/var/tmp", help="where the images go (a temporary directory inside it)")
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "wpdump-bench"), help="bench-migrate.json/.md")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("run it as root (network namespaces, CRIU)")
    sys.path.insert(0, str(HERE.parent / "plugin"))
    from wpdump.workloads import compile_c

    work = pathlib.Path(tempfile.mkdtemp(prefix="wpdump-bench-migrate-", dir=args.dir))
    exe = compile_c(HERE.parent / "tests" / "targets" / "selfcheck.c", out_dir=work)
    hosts = Hosts(args.rate, prefix="wpb")
    rows = []
    try:
        for mib in (int(x) for x in args.sizes.split(",")):
            for method in args.methods.split(","):
                rows.append(run_one(method, hosts, exe, work, mib, args.dirty, args.max_iterations))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # kept should a later run fail
    except (TimeoutError, RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        print(f"bench migrate: {e}", file=sys.stderr)
        return 1
    finally:
        hosts.remove()
        shutil.rmtree(work, ignore_errors=True)
    text = (f"live migration, {args.dirty:g} % of the pages written per second, link {args.rate} (tbf), "
            f"wpdump with at most {args.max_iterations} pre-dumps\n\n{table(rows)}\n")
    ratios = []
    for mib in sorted({r["mib"] for r in rows}):
        by = {r["method"]: r for r in rows if r["mib"] == mib}
        if "criu" in by and "wpdump" in by:
            ratio = by["wpdump"]["downtime_s"] / by["criu"]["downtime_s"]
            ratios.append(f"{mib} MiB: downtime wpdump/criu = {ratio:.3f}")
    text += "\n" + "\n".join(ratios) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench-migrate.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.out, "bench-migrate.md"), "w") as f:
        f.write(text)
    return 0
