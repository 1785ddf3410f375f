"""Command line: a thin layer over the package (pre-dump, dump, checkpoint, status, untrack, track, demo)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from . import iteration
from .convergence import POLICIES
from .errors import WpdumpError
from .iteration import IterationResult
from .tracker import Harvest, Tracker

PAGE = 4096


def _pages(r) -> int:
    return int((r[:, 1] - r[:, 0]).sum()) // PAGE if len(r) else 0


def _record(h: Harvest) -> dict:
    return {
        "round": h.round,
        "copy_pages": h.copy_bytes // PAGE,
        "zero_pages": _pages(h.zero_ranges()),
        "events": [str(e) for e in h.events],
        "harvest_ms": round(h.seconds * 1e3, 3),
    }


def _print_round(h: Harvest, args: argparse.Namespace) -> None:
    rec = _record(h)
    if args.json:
        if not args.verbose:
            rec["events"] = len(h.events)
        print(json.dumps(rec), flush=True)
        return
    print(
        f"round {rec['round']:>4}  copy {rec['copy_pages']:>9} pages  zeroed {rec['zero_pages']:>7} pages  "
        f"events {len(h.events):>3}  harvest {rec['harvest_ms']:>8.2f} ms",
        flush=True,
    )
    if args.verbose:
        for e in h.events:
            print(f"    {e}", flush=True)


def cmd_track(args: argparse.Namespace) -> int:
    with Tracker(args.target, allow_userfaultfd_target=args.allow_userfaultfd_target) as tr:
        _print_round(tr.initial, args)
        n = 0
        while args.rounds == 0 or n < args.rounds:
            time.sleep(args.interval)
            _print_round(tr.harvest(), args)
            n += 1
    return 0


# ---- iterations ----


class ProgressBar:
    """A one-line progress bar on stderr for copies of more than 64 MiB (only on a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total < (64 << 20):
            return
        width = 30
        fill = int(width * done / total)
        print(f"\r  [{'#' * fill}{'.' * (width - fill)}] {done >> 20}/{total >> 20} MiB", end="", file=sys.stderr,
              flush=True)
        self.shown = True
        if done >= total:
            self.clear()

    def clear(self) -> None:
        if self.shown:
            print("\r" + " " * 60 + "\r", end="", file=sys.stderr, flush=True)
            self.shown = False


HEADER = (f"{'iter':>4} {'kind':<8} {'scanned':>9} {'written':>9} {'parent':>9} {'zeroed':>8} {'MiB':>9} "
          f"{'ms':>9} {'frozen ms':>9}")


def _row(n: int | str, r: IterationResult) -> str:
    frozen = f"{r.frozen_s * 1e3:9.1f}" if r.kind == "dump" else f"{'-':>9}"
    return (f"{n!s:>4} {r.kind:<8} {r.pages_scanned:>9} {r.pages_written:>9} {r.pages_parent:>9} "
            f"{r.pages_zeroed:>8} {r.bytes_written / 2**20:>9.1f} {r.total_s * 1e3:>9.1f} {frozen}")


def _report(r: IterationResult, args: argparse.Namespace, n: int | str = 1, reason: str | None = None) -> None:
    for w in r.warnings:
        print(f"wpdump: warning: {w}", file=sys.stderr)
    if args.json:
        d = r.as_dict()
        if reason:
            d["stop_reason"] = reason
        print(json.dumps(d), flush=True)
    else:
        print(_row(n, r), flush=True)


def cmd_pre_dump(args: argparse.Namespace, final: bool = False) -> int:
    bar = ProgressBar(not args.json)
    try:
        r = iteration.run(
            args.tree, args.images_dir, args.prev_images_dir, final=final,
            leave_stopped=getattr(args, "leave_stopped", False),
            keep_tracking=getattr(args, "keep_tracking", None) or None, progress=bar, **_safety_kw(args),
        )
    finally:
        bar.clear()
    if not args.json:
        print(HEADER)
    _report(r, args)
    return 0


def _safety_kw(args: argparse.Namespace) -> dict:
    return {"allow_userfaultfd_target": args.allow_userfaultfd_target, "allow_unreadable": args.allow_unreadable}


def safety_args(q: argparse.ArgumentParser) -> None:
    """Options that let an iteration go on where it refuses by default."""
    q.add_argument("--allow-userfaultfd-target", action="store_true",
                   help="track a process that uses userfaultfd itself (its UFFDIO_REGISTER then fails with EBUSY "
                   "while tracked; what it registered is dumped whole every round)")
    q.add_argument("--allow-unreadable", action="store_true",
                   help="dump a process with memfd_secret memory, recording that memory as lost (warning)")


def cmd_dump(args: argparse.Namespace) -> int:
    return cmd_pre_dump(args, final=True)


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from .checkpoint import checkpoint

    kw = {"max_iterations": args.max_iterations}
    if args.policy == "phaul":
        kw.update(dirty_pages=args.dirty_pages, growth=args.growth / 100)
    else:
        kw.update(skipped=args.skipped / 100)
    policy = POLICIES[args.policy](**kw)
    bar = ProgressBar(not args.json)
    if not args.json:
        print(HEADER, flush=True)
    count = [0]

    def on_iteration(r: IterationResult, reason: str | None) -> None:
        bar.clear()
        count[0] += 1
        _report(r, args, count[0], reason)
        if reason and not args.json:
            print(f"     stop pre-dumping: {reason}", flush=True)

    hist = checkpoint(
        args.tree, args.images_dir, policy, interval=args.interval, leave_stopped=args.leave_stopped,
        keep_tracking=args.keep_tracking, on_iteration=on_iteration, progress=bar, **_safety_kw(args),
    )
    if not args.json:
        print(f"final dump: {hist[-1].images_dir} (frozen {hist[-1].frozen_s * 1e3:.1f} ms)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    rows = iteration.status()
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print("no process is tracked")
        return 0
    print(f"{'pid':>8} {'keeper':>8} {'since':<19} {'iterations':>10}  last iteration")
    for r in rows:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["since"]))
        print(f"{r['pid']:>8} {r['keeper']:>8} {since:<19} {r['checkins']:>10}  {r['images_dir']}")
    return 0


def cmd_untrack(args: argparse.Namespace) -> int:
    if not iteration.untrack(args.tree):
        print(f"wpdump: pid {args.tree} is not tracked", file=sys.stderr)
        return 1
    return 0


def cmd_restore_memory(args: argparse.Namespace) -> int:
    from .rollback import restore_memory

    r = restore_memory(args.tree, args.images_dir)
    if args.json:
        print(json.dumps(r.as_dict()))
    else:
        how = "pages dirtied since the checkpoint (tracked)" if r.tracked else "every page (not tracked since)"
        print(f"pid {r.pid} rolled back to {r.images_dir}: examined {r.pages_examined} {how}, wrote "
              f"{r.pages_written}, dropped {r.pages_dropped}; frozen {r.frozen_s * 1e3:.1f} ms")
    return 0


def cmd_criu_hook(args: argparse.Namespace) -> int:
    from .criu_hook import run_hook

    return run_hook()


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.run(mib=args.mib, rounds=args.rounds, interval=args.interval, percent=args.percent,
                    images_dir=args.dir)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wpdump", description="Incremental checkpoints of live Linux processes.")
    sub = p.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="more log output (repeat for more)")
    common.add_argument("-o", "--log-file", metavar="FILE", help="write the log to FILE as well")
    common.add_argument("--json", action="store_true", help="machine-readable output: one JSON object per line")

    def iteration_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("-t", "--tree", type=int, required=True, metavar="PID", help="process to dump")
        q.add_argument("-D", "--images-dir", required=True, metavar="DIR", help="directory for the images")
        q.add_argument("--prev-images-dir", metavar="PATH",
                       help="previous iteration, relative to DIR as in CRIU (e.g. ../1); becomes the parent link")
        safety_args(q)

    pd = sub.add_parser("pre-dump", parents=[common], help="write one iteration; the target keeps running")
    iteration_args(pd)
    pd.set_defaults(func=cmd_pre_dump)

    du = sub.add_parser("dump", parents=[common], help="the final iteration, with the target frozen")
    iteration_args(du)
    du.add_argument("--leave-stopped", action="store_true", help="leave the target stopped (SIGSTOP) afterwards")
    du.add_argument("--keep-tracking", action="store_true", help="go on tracking after the dump")
    du.set_defaults(func=cmd_dump)

    cp = sub.add_parser("checkpoint", parents=[common], help="pre-dumps into DIR/1, DIR/2, ... then the final dump")
    cp.add_argument("-t", "--tree", type=int, required=True, metavar="PID", help="process to dump")
    cp.add_argument("-D", "--images-dir", required=True, metavar="DIR", help="new or empty directory")
    cp.add_argument("--policy", choices=sorted(POLICIES), default="phaul", help="convergence policy (phaul)")
    cp.add_argument("--max-iterations", type=int, default=8, metavar="N", help="pre-dumps at most (8)")
    cp.add_argument("--dirty-pages", type=int, default=64, metavar="N", help="phaul: stop at <= N dirty pages (64)")
    cp.add_argument("--growth", type=float, default=10.0, metavar="PCT",
                    help="phaul: stop when the dirty set grows by more than PCT %% (10)")
    cp.add_argument("--skipped", type=float, default=70.0, metavar="PCT",
                    help="lxd: stop when PCT %% of the pages are in the parent (70)")
    cp.add_argument("--interval", type=float, default=0.0, metavar="SEC", help="pause between pre-dumps (0)")
    cp.add_argument("--leave-stopped", action="store_true", help="leave the target stopped after the final dump")
    cp.add_argument("--keep-tracking", action="store_true", help="go on tracking after the final dump")
    safety_args(cp)
    cp.set_defaults(func=cmd_checkpoint)

    rm = sub.add_parser("restore-memory", parents=[common],
                        help="roll a live process's memory back to a checkpoint, in place")
    rm.add_argument("-t", "--tree", type=int, required=True, metavar="PID", help="process to roll back")
    rm.add_argument("-D", "--images-dir", required=True, metavar="DIR", help="the checkpoint (top of its chain)")
    rm.set_defaults(func=cmd_restore_memory)

    ch = sub.add_parser(
        "criu-hook", help="CRIU action script (criu dump --action-script .venv/bin/wpdump-criu-hook)",
        description="Run by criu dump as its action script. At post-dump (tree still frozen) it rewrites CRIU's "
        "final pagemap so that pages unchanged since wpdump's last pre-dump point into the wpdump chain. "
        "Whenever it cannot vouch for that, it leaves CRIU's full images untouched. Always exits 0.",
    )
    ch.set_defaults(func=cmd_criu_hook)

    stp = sub.add_parser("status", parents=[common], help="list the tracked processes")
    stp.set_defaults(func=cmd_status)

    ut = sub.add_parser("untrack", parents=[common], help="end tracking of a process (it runs on unprotected)")
    ut.add_argument("-t", "--tree", type=int, required=True, metavar="PID")
    ut.set_defaults(func=cmd_untrack)

    from .cli_chain import add_commands

    add_commands(sub, common)

    t = sub.add_parser("track", help="attach to a process and report the pages it writes, round by round")
    t.add_argument("-t", "--target", type=int, required=True, metavar="PID", help="process to track")
    t.add_argument("--rounds", type=int, default=0, help="rounds after the attach (default 0: until Ctrl-C)")
    t.add_argument("--interval", type=float, default=1.0, metavar="SEC", help="seconds between rounds (1.0)")
    t.add_argument("--json", action="store_true", help="one JSON object per round")
    t.add_argument("-v", "--verbose", action="store_true", help="print the VMA events of each round")
    t.add_argument("--allow-userfaultfd-target", action="store_true",
                   help="track a process that uses userfaultfd itself (its UFFDIO_REGISTER fails with EBUSY meanwhile)")
    t.set_defaults(func=cmd_track)

    d = sub.add_parser("demo", help="checkpoint the bundled workload while it writes, then verify the chain")
    d.add_argument("--mib", type=int, default=64, help="workload size in MiB (64)")
    d.add_argument("--rounds", type=int, default=5, help="pre-dumps at most before the final dump (5)")
    d.add_argument("--interval", type=float, default=0.5, metavar="SEC", help="seconds between pre-dumps (0.5)")
    d.add_argument("--percent", type=float, default=1.0, help="%% of pages the workload writes per 100 ms (1)")
    d.add_argument("--dir", metavar="DIR", help="where to write the chain (default: a new directory in /tmp)")
    d.set_defaults(func=cmd_demo)
    return p


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING - 10 * min(getattr(args, "verbose", 0) or 0, 2)
    handlers: list[logging.Handler] = []
    if getattr(args, "log_file", None):
        fh = logging.FileHandler(args.log_file)
        fh.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        fh.setLevel(logging.DEBUG)
        handlers.append(fh)
    if level < logging.WARNING:  # warnings themselves are printed by the commands
        sh = logging.StreamHandler(sys.stderr)
        sh.setLevel(level)
        handlers.append(sh)
    root = logging.getLogger("wpdump")
    root.setLevel(logging.DEBUG if handlers else logging.ERROR)
    root.propagate = False
    for h in handlers:
        root.addHandler(h)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _setup_logging(args)
    try:
        return args.func(args)
    except WpdumpError as e:
        print(f"wpdump: {e}", file=sys.stderr)
        logging.getLogger("wpdump").debug("failed", exc_info=True)
        return 1
    except OSError as e:  # e.g. the -o log file or a directory we cannot even look at
        print(f"wpdump: {e.filename or ''}: {e.strerror or e}" if e.filename else f"wpdump: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the with-blocks have closed the tracker: the target runs on, unprotected
        from .imgdir import remove_own_leftovers

        remove_own_leftovers()
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `wpdump track ... | head`
        sys.stderr.close()
        return 1


if __name__ == "__main__":
    sys.exit(main())
