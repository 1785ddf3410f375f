"""The command line, a thin layer over the package: ``main`` parses and runs pre-dump, dump, checkpoint,
restore-memory, criu-hook, status, untrack, track and demo; chain.py adds show/decode/verify/squash/dedup,
report.py prints an iteration's line, demo.py runs the demo. Only the standard library is imported before a
command runs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING

# Only the standard library at import time: a Ctrl-C during start-up lands in main()'s handler, and
# --help answers at once. The commands import what they use.
if TYPE_CHECKING:
    from ..dump.iteration import IterationResult
    from ..tracking.tracker import Harvest

POLICY_NAMES = ("lxd", "phaul")  # convergence.POLICIES
log = logging.getLogger("wpdump.cli")


def _record(h: Harvest) -> dict:
    from ..ranges import PAGE, total

    return {
        "round": h.round,
        "copy_pages": h.copy_bytes // PAGE,
        "zero_pages": total(h.zero_ranges()) // PAGE,
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
    from ..tracking.tracker import Tracker

    with Tracker(args.tree, allow_userfaultfd_target=args.allow_userfaultfd_target) as tr:
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


def _report(r: IterationResult, args: argparse.Namespace, n: int | str = 1, reason: str | None = None,
            header: bool = False) -> None:
    from .report import HEADER, row

    for w in r.warnings:  # logged where they arose (the log file has them); printed here, once
        print(f"wpdump: warning: {w}", file=sys.stderr)
    log.info("iteration %s: %s", n, " ".join(row(n, r).split()[1:]))
    log.debug("iteration %s: %s", n, json.dumps({k: v for k, v in r.as_dict().items() if k != "warnings"}))
    if args.json:
        d = r.as_dict()
        if reason:
            d["stop_reason"] = reason
        print(json.dumps(d), flush=True)
    else:
        if header:
            print(HEADER)
        print(row(n, r), flush=True)


def chain_depth(images_dir: str) -> int:
    """1 + the number of parent links below ``images_dir`` (its number in the chain, as checkpoint numbers)."""
    from ..images.imgdir import walk_links

    return max(1, sum(1 for _, err in walk_links(images_dir) if err is None))


class _Interrupt:
    """What an interrupted command had promised and done, for the one line printed at the end."""

    pid: int | None = None
    images_dir: str | None = None
    keep_tracking: bool | None = None  # what the command promised for tracking (None: no promise)
    checkpoint = False  # DIR holds numbered iterations


_interrupt = _Interrupt()


def cmd_pre_dump(args: argparse.Namespace, final: bool = False) -> int:
    from ..dump import iteration

    keep = getattr(args, "keep_tracking", False) or not final
    _interrupt.pid, _interrupt.images_dir, _interrupt.keep_tracking = args.tree, args.images_dir, keep
    bar = ProgressBar(not args.json)
    try:
        r = iteration.run(
            args.tree, args.images_dir, args.prev_images_dir, final=final,
            leave_stopped=getattr(args, "leave_stopped", False), keep_tracking=keep, progress=bar,
            **_safety_kw(args),
        )
    finally:
        bar.clear()
    _interrupt.pid = None
    _report(r, args, chain_depth(r.images_dir), header=True)
    return 0


def _safety_kw(args: argparse.Namespace) -> dict:
    return {"allow_userfaultfd_target": args.allow_userfaultfd_target, "allow_unreadable": args.allow_unreadable,
            "single": args.single}


def safety_args(q: argparse.ArgumentParser) -> None:
    """Options that let an iteration go on where it refuses by default."""
    q.add_argument("--allow-userfaultfd-target", action="store_true",
                   help="track a process that uses userfaultfd itself (its UFFDIO_REGISTER then fails with EBUSY "
                   "while tracked; what it registered is dumped whole every round)")
    q.add_argument("--allow-unreadable", action="store_true",
                   help="dump a process with memfd_secret memory, recording that memory as lost (warning)")
    q.add_argument("--single", action="store_true",
                   help="the process PID alone, not the tree rooted at it (its children are left out)")


def cmd_dump(args: argparse.Namespace) -> int:
    return cmd_pre_dump(args, final=True)


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from ..dump.checkpoint import checkpoint
    from ..dump.convergence import POLICIES

    kw = {"max_iterations": args.max_iterations}
    if args.policy == "phaul":
        kw.update(dirty_pages=args.dirty_pages, growth=args.growth / 100)
    else:
        kw.update(skipped=args.skipped / 100)
    policy = POLICIES[args.policy](**kw)
    bar = ProgressBar(not args.json)
    _interrupt.pid, _interrupt.images_dir, _interrupt.keep_tracking = args.tree, args.images_dir, args.keep_tracking
    _interrupt.checkpoint = True
    count = [0]

    def on_iteration(r: IterationResult, reason: str | None) -> None:
        bar.clear()
        count[0] += 1
        _report(r, args, count[0], reason, header=count[0] == 1)  # the header once something is written
        if reason and not args.json:
            print(f"     stop pre-dumping: {reason}", flush=True)

    hist = checkpoint(
        args.tree, args.images_dir, policy, interval=args.interval, leave_stopped=args.leave_stopped,
        keep_tracking=args.keep_tracking, on_iteration=on_iteration, progress=bar, **_safety_kw(args),
    )
    _interrupt.pid = None
    if not args.json:
        print(f"final dump: {hist[-1].images_dir} (frozen {hist[-1].frozen_s * 1e3:.1f} ms)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from ..dump import iteration

    rows = iteration.status()
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print("no process is tracked")
        return 0
    print(f"{'pid':>8} {'procs':>5} {'keeper':>8} {'since':<19} {'iterations':>10} {'restores':>8}  last iteration")
    for r in rows:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["since"]))
        print(f"{r['pid']:>8} {len(r.get('members', [])):>5} {r['keeper']:>8} {since:<19} {r['checkins']:>10} "
              f"{r.get('restores', 0):>8}  {r['images_dir']}")
    return 0


def cmd_untrack(args: argparse.Namespace) -> int:
    from ..dump import iteration

    if not iteration.untrack(args.tree):
        print(f"wpdump: pid {args.tree} is not tracked", file=sys.stderr)
        return 1
    return 0


def cmd_restore_memory(args: argparse.Namespace) -> int:
    from ..chainops.rollback import restore_memory

    r = restore_memory(args.tree, args.images_dir, single=args.single)
    if args.json:
        print(json.dumps(r.as_dict()))
    else:
        how = "pages dirtied since the checkpoint (tracked)" if r.tracked else "every page (not tracked since)"
        procs = f" ({r.processes} processes)" if r.processes > 1 else ""
        print(f"pid {r.pid}{procs} rolled back to {r.images_dir}: examined {r.pages_examined} {how}, wrote "
              f"{r.pages_written}, dropped {r.pages_dropped}; frozen {r.frozen_s * 1e3:.1f} ms")
    return 0


def cmd_criu_hook(args: argparse.Namespace) -> int:
    from ..dump.criu_hook import run_hook

    return run_hook()


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.run(mib=args.mib, rounds=args.rounds, interval=args.interval, percent=args.percent,
                    images_dir=args.images_dir, keep=args.keep, json_out=args.json)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples as written (line breaks kept)."""


def add_command(sub: argparse._SubParsersAction, name: str, summary: str, description: str, examples: str,
                parents: list[argparse.ArgumentParser] | tuple = ()) -> argparse.ArgumentParser:
    """A subcommand with a one-line summary (wpdump --help), a description and examples (wpdump NAME --help)."""
    ex = "\n".join(f"  {line}" for line in examples.strip().splitlines())
    return sub.add_parser(name, parents=list(parents), help=summary, description=f"{summary}.\n\n{description}",
                          epilog=f"example:\n{ex}", formatter_class=_Formatter)


TREE_HELP = "root of the process tree to dump: PID and all its descendants, as in CRIU (--single: PID alone)"


def add_tree(q: argparse.ArgumentParser, help_text: str, required: bool = True) -> None:
    """-t/--tree PID, as CRIU names it."""
    q.add_argument("-t", "--tree", type=int, required=required, metavar="PID", help=help_text)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("wpdump")
    except PackageNotFoundError:
        return "unknown"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wpdump", formatter_class=_Formatter,
        description="Incremental checkpoints of live Linux processes (userfaultfd async write-protect +\n"
                    "PAGEMAP_SCAN), written as CRIU image chains. Option names follow CRIU's.",
        epilog="example:\n  wpdump checkpoint -t 1234 -D /var/tmp/ckpt\n  wpdump show -D /var/tmp/ckpt\n"
               "  wpdump COMMAND --help    (each command's options and an example)",
    )
    p.add_argument("--version", action="version", version=f"wpdump {version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0,
                        help="log to stderr: -v what is done, -vv details (as criu -v)")
    common.add_argument("-o", "--log-file", metavar="FILE", help="write the full log (details, warnings, errors with "
                        "their traceback) to FILE as well (as criu -o)")
    common.add_argument("--json", action="store_true", help="machine-readable output: one JSON object per line")

    def iteration_args(q: argparse.ArgumentParser) -> None:
        add_tree(q, TREE_HELP)
        q.add_argument("-D", "--images-dir", required=True, metavar="DIR", help="new or empty directory for the images")
        q.add_argument("--prev-images-dir", metavar="PATH",
                       help="previous iteration, relative to DIR as in CRIU (e.g. ../1); becomes the parent link")
        safety_args(q)

    pd = add_command(
        sub, "pre-dump", "write one iteration; the target keeps running",
        "The first pre-dump of a process tree writes everything and starts tracking its writes (a keeper process\n"
        "holds the tracking between invocations); the next, with --prev-images-dir, writes only what changed.\n"
        "As in CRIU, -t PID is PID and all its descendants: one pagemap-VPID.img per process, named by its pid\n"
        "inside the tree's pid namespace; a process new since the parent is written in full.",
        "wpdump pre-dump -t 1234 -D img/1\nwpdump pre-dump -t 1234 -D img/2 --prev-images-dir ../1", [common])
    iteration_args(pd)
    pd.set_defaults(func=cmd_pre_dump)

    du = add_command(
        sub, "dump", "the final iteration, with the target frozen",
        "Freezes every thread of every process of the tree (ptrace, until no new process appears) for the\n"
        "harvest and the copy, then resumes them (unless --leave-stopped). Ends tracking unless --keep-tracking.",
        "wpdump dump -t 1234 -D img/3 --prev-images-dir ../2 --leave-stopped", [common])
    iteration_args(du)
    du.add_argument("--leave-stopped", action="store_true", help="leave the target stopped (SIGSTOP) afterwards")
    du.add_argument("--keep-tracking", action="store_true", help="go on tracking after the dump")
    du.set_defaults(func=cmd_dump)

    cp = add_command(
        sub, "checkpoint", "pre-dumps into DIR/1, DIR/2, ... until they converge, then the final dump",
        "One line per iteration. Ctrl-C ends it cleanly: the target runs on, tracking ends (unless\n"
        "--keep-tracking), the iterations completed stay in DIR, and one line says so.",
        "wpdump checkpoint -t 1234 -D ckpt --max-iterations 5 --leave-stopped\n"
        "wpdump checkpoint -t 1234 -D ckpt --policy lxd --skipped 80 --json", [common])
    add_tree(cp, TREE_HELP)
    cp.add_argument("-D", "--images-dir", required=True, metavar="DIR", help="new or empty directory")
    cp.add_argument("--policy", choices=POLICY_NAMES, default="phaul", help="convergence policy (phaul)")
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

    rm = add_command(
        sub, "restore-memory", "roll a live process's memory back to a checkpoint, in place",
        "Freezes the tree, checks its processes and each one's VMA layout are the checkpoint's (refuses\n"
        "otherwise, untouched), writes back the pages that differ, drops the pages the image lacks, resumes it.\n"
        "Memory only, not registers.",
        "wpdump restore-memory -t 1234 -D ckpt/3", [common])
    add_tree(rm, "root of the process tree to roll back")
    rm.add_argument("--single", action="store_true", help="the process PID alone, not its tree")
    rm.add_argument("-D", "--images-dir", required=True, metavar="DIR", help="the checkpoint (top of its chain)")
    rm.set_defaults(func=cmd_restore_memory)

    ch = add_command(
        sub, "criu-hook", "CRIU action script (criu dump --action-script .venv/bin/wpdump-criu-hook)",
        "Run by criu dump as its action script. At post-dump (tree still frozen) it rewrites CRIU's final\n"
        "pagemap so that pages unchanged since wpdump's last pre-dump point into the wpdump chain. Whenever\n"
        "it cannot vouch for that, it leaves CRIU's full images untouched. Always exits 0.",
        'criu dump -t 1234 -D img/final --action-script "$PWD/.venv/bin/wpdump-criu-hook"')
    ch.set_defaults(func=cmd_criu_hook)

    stp = add_command(sub, "status", "list the tracked process trees",
                      "Per tracked tree (its root pid): processes tracked, its keeper, since when, iterations\n"
                      "written and restore-memory runs since, and the iteration tracking is relative to.",
                      "wpdump status\nwpdump status --json",
                      [common])
    stp.set_defaults(func=cmd_status)

    ut = add_command(sub, "untrack", "end tracking of a process tree (it runs on unprotected)",
                     "The keeper closes the userfaultfds: every write-protection is dropped. The next pre-dump of\n"
                     "the tree is a full one.", "wpdump untrack -t 1234", [common])
    add_tree(ut, "root of the tracked process tree")
    ut.set_defaults(func=cmd_untrack)

    from .chain import add_commands

    add_commands(sub, common, add_command)
    from ..migrate.cli import add_commands as add_migrate_commands

    add_migrate_commands(sub, common, add_command)

    t = add_command(sub, "track", "attach to a process and report the pages it writes, round by round",
                    "Per round: pages written since the previous round, pages that became zero, VMA events\n"
                    "(-v lists them). Until Ctrl-C unless --rounds.",
                    "wpdump track -t 1234 --rounds 10 --interval 0.5 -v", [common])
    add_tree(t, "process to track", required=False)
    t.add_argument("--target", type=int, dest="tree", help=argparse.SUPPRESS)  # the old spelling
    t.add_argument("--rounds", type=int, default=0, help="rounds after the attach (default 0: until Ctrl-C)")
    t.add_argument("--interval", type=float, default=1.0, metavar="SEC", help="seconds between rounds (1.0)")
    t.add_argument("--allow-userfaultfd-target", action="store_true",
                   help="track a process that uses userfaultfd itself (its UFFDIO_REGISTER fails with EBUSY meanwhile)")
    t.set_defaults(func=cmd_track, check=lambda a: "-t/--tree PID is required" if a.tree is None else None)

    d = add_command(sub, "demo", "checkpoint the bundled workload while it writes, then verify the chain",
                    "Starts a workload, runs checkpoint on it (--leave-stopped), compares the final dump with its\n"
                    "memory byte for byte. The chain is written into a new directory in $TMPDIR (or /tmp) and\n"
                    "removed at the end, unless --keep or -D DIR.",
                    "wpdump demo\nwpdump demo --mib 256 --rounds 8 -D /var/tmp/demo", [common])
    d.add_argument("--mib", type=int, default=64, help="workload size in MiB (64)")
    d.add_argument("--rounds", type=int, default=5, help="pre-dumps at most before the final dump (5)")
    d.add_argument("--interval", type=float, default=0.5, metavar="SEC", help="seconds between pre-dumps (0.5)")
    d.add_argument("--percent", type=float, default=1.0, help="%% of pages the workload writes per 100 ms (1)")
    d.add_argument("-D", "--images-dir", metavar="DIR",
                   help="where to write the chain (kept); default: a temporary directory, removed at the end")
    d.add_argument("--dir", dest="images_dir", help=argparse.SUPPRESS)  # the old spelling
    d.add_argument("--keep", action="store_true", help="keep the temporary directory (its path is printed)")
    d.set_defaults(func=cmd_demo)
    return p


class _BelowWarning(logging.Filter):
    """Warnings and errors reach the terminal as the commands' own "wpdump: ..." lines, not twice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def _setup_logging(args: argparse.Namespace, argv: list[str]) -> None:
    verbose = getattr(args, "verbose", 0) or 0
    handlers: list[logging.Handler] = []
    if getattr(args, "log_file", None):
        fh = logging.FileHandler(args.log_file)
        fh.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"))
        fh.setLevel(logging.DEBUG)
        handlers.append(fh)
    if verbose:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(logging.Formatter("wpdump: %(message)s"))
        sh.setLevel(logging.INFO if verbose == 1 else logging.DEBUG)
        sh.addFilter(_BelowWarning())
        handlers.append(sh)
    root = logging.getLogger("wpdump")
    root.setLevel(logging.DEBUG if handlers else logging.CRITICAL)
    root.propagate = False
    for h in handlers:
        root.addHandler(h)
    log.info("command: wpdump %s", " ".join(argv))
    log.debug("wpdump %s, python %s, pid %d", version(), sys.version.split()[0], os.getpid())


def _signal_name(signum: int) -> str:
    return signal.Signals(signum).name


_received: list[int] = []


def _on_signal(signum: int, frame: object) -> None:
    _received.append(signum)
    raise KeyboardInterrupt


def _process_state(pid: int) -> str:
    """'tracked since DIR' / 'not tracked', 'running' / 'stopped' / 'exited' of ``pid`` now."""
    from ..target.process import all_stopped, is_gone
    from ..tracking import keeper

    if is_gone(pid):
        return f"pid {pid} exited"
    try:
        stopped = all_stopped(pid)
    except Exception:  # noqa: BLE001 - gone meanwhile
        return f"pid {pid} exited"
    tracked = None
    try:
        k = keeper.Keeper.connect(pid)
        if k is not None:
            try:
                tracked = k.status().get("images_dir") or "?"
            finally:
                k.close()
    except keeper.KeeperError:
        tracked = None
    track = f"tracked since {tracked}" if tracked else "not tracked"
    return f"pid {pid} {track}, {'stopped' if stopped else 'running'}"


def _interrupted(signum: int) -> str:
    """Clean up after an interrupt as the command promised; the one line saying what was left in which state."""
    from ..images.imgdir import remove_own_leftovers

    remove_own_leftovers()
    what = f"wpdump: interrupted ({_signal_name(signum)})"
    st = _interrupt
    if st.pid is None:
        return what
    pid = st.pid
    from ..target.process import is_gone

    if st.keep_tracking is False and not is_gone(pid):  # the command promised tracking would end
        try:
            from ..dump import iteration

            iteration.untrack(pid)
        except Exception as e:  # noqa: BLE001 - say it instead
            log.debug("untrack after the interrupt failed", exc_info=True)
            what += f" (ending tracking failed: {e})"
    state = _process_state(pid)
    if st.keep_tracking and "not tracked" in state:
        state = state.replace("not tracked", "not tracked (lost with the interrupted iteration: the next pre-dump "
                              "is full)")
    d = os.path.abspath(st.images_dir or ".")
    if st.checkpoint:  # the completed iterations stay
        from ..images.chain import META_FILE, checkpoint_iterations

        its = checkpoint_iterations(d)
        if not its:
            return f"{what}: {state}; {d} not written"
        done = its[0] if len(its) == 1 else f"{its[0]} .. {os.path.basename(its[-1])}"
        try:
            with open(os.path.join(its[-1], META_FILE)) as f:
                final = json.load(f).get("kind") == "dump"
        except (OSError, ValueError):
            final = False
        return f"{what}: {state}; {done} written" + ("" if final else " (pre-dumps), no final dump")
    from ..images.chain import META_FILE

    done = os.path.exists(os.path.join(d, META_FILE))  # interrupted after its commit: complete
    return f"{what}: {state}; {d} {'written' if done else 'not written'}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # the same clean end as Ctrl-C,
        if signal.getsignal(sig) is not signal.SIG_IGN:  # unless ignored on purpose (nohup, a script's `cmd &`)
            signal.signal(sig, _on_signal)
    try:
        ps = parser()
        args = ps.parse_args(argv)
        if getattr(args, "check", None) is not None and (why := args.check(args)):
            print(f"wpdump {args.command}: {why}", file=sys.stderr)
            return 2
        _setup_logging(args, argv)
        rc = args.func(args)
        log.debug("exit status %d", rc)
        return rc
    except KeyboardInterrupt:  # the with-blocks have closed the tracker and resumed the target
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        signum = _received[-1] if _received else signal.SIGINT
        try:
            line = _interrupted(signum)
        except Exception as e:  # noqa: BLE001
            line = f"wpdump: interrupted ({_signal_name(signum)}); the cleanup failed: {e}"
        print(file=sys.stderr)
        print(line, file=sys.stderr)
        log.info("%s", line)
        return 128 + signum  # 130 for Ctrl-C, as a shell reports it
    except BrokenPipeError:  # e.g. `wpdump track ... | head`
        sys.stderr.close()
        return 1
    except Exception as e:
        from ..errors import WpdumpError

        if isinstance(e, WpdumpError):
            line = f"wpdump: {e}"
        elif isinstance(e, OSError):  # e.g. the -o log file or a directory we cannot even look at
            line = f"wpdump: {e.filename}: {e.strerror or e}" if e.filename else f"wpdump: {e.strerror or e}"
        else:
            raise
        print(line, file=sys.stderr)
        logging.getLogger("wpdump").error("%s", line, exc_info=True)
        return 1
