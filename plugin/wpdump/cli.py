"""Command line: ``wpdump track`` (watch a process's writes) and ``wpdump demo``."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .errors import WpdumpError
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
    with Tracker(args.target) as tr:
        _print_round(tr.initial, args)
        n = 0
        while args.rounds == 0 or n < args.rounds:
            time.sleep(args.interval)
            _print_round(tr.harvest(), args)
            n += 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.run(mib=args.mib, rounds=args.rounds, interval=args.interval, percent=args.percent)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wpdump", description="Incremental checkpoints of live Linux processes.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("track", help="attach to a process and report the pages it writes, round by round")
    t.add_argument("-t", "--target", type=int, required=True, metavar="PID", help="process to track")
    t.add_argument("--rounds", type=int, default=0, help="rounds after the attach (default 0: until Ctrl-C)")
    t.add_argument("--interval", type=float, default=1.0, metavar="SEC", help="seconds between rounds (1.0)")
    t.add_argument("--json", action="store_true", help="one JSON object per round")
    t.add_argument("-v", "--verbose", action="store_true", help="print the VMA events of each round")
    t.set_defaults(func=cmd_track)

    d = sub.add_parser("demo", help="track the bundled workload, copy its dirty pages, verify the copy")
    d.add_argument("--mib", type=int, default=64, help="workload size in MiB (64)")
    d.add_argument("--rounds", type=int, default=5, help="harvest rounds before the verification (5)")
    d.add_argument("--interval", type=float, default=1.0, metavar="SEC", help="seconds between rounds (1.0)")
    d.add_argument("--percent", type=float, default=1.0, help="%% of pages the workload writes per 100 ms (1)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except WpdumpError as e:
        print(f"wpdump: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the with-blocks have closed the tracker: the target runs on, unprotected
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `wpdump track ... | head`
        sys.stderr.close()
        return 1


if __name__ == "__main__":
    sys.exit(main())
