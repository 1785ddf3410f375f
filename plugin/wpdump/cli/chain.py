"""Commands that work on written checkpoints (show, decode, verify, squash, dedup): thin over the modules."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEDUP_HELP = """\
Punch holes (fallocate PUNCH_HOLE|KEEP_SIZE) in the parents' pages files for the pages the chain's top no
longer reads from them: pages a higher iteration holds itself or dropped. Like criu dedup. The files keep their
size, and the chain stays valid for its top (verify passes). The parents themselves are NO LONGER complete
checkpoints afterwards: restoring, verifying or squashing an older iteration, or naming it as the parent of a
new pre-dump, reads zeros where pages were punched. Prints the bytes freed (drop of the files' allocated blocks).
"""


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t is not None else "-"


# ---- show ----


def cmd_show(args: argparse.Namespace) -> int:
    from ..chainops.show import resolve_top, show

    top = resolve_top(args.images_dir or args.dir)
    info = show(top, regions=args.verbose > 0)
    if args.json:
        print(json.dumps(info.as_dict()))
    else:
        print(f"{'#':>2} {'kind':<8} {'created':<19} {'procs':>5} {'present':>9} {'parent':>9} {'listed':>9} "
              f"{'zeroed':>7} {'MiB':>8} {'alloc MiB':>9} {'frozen ms':>9}  dir")
        for lv in info.levels:
            frozen = f"{lv.frozen_us / 1e3:9.1f}" if lv.frozen_us is not None else f"{'-':>9}"
            zeroed = f"{lv.pages_zeroed:>7}" if lv.pages_zeroed is not None else f"{'-':>7}"
            print(f"{lv.depth:>2} {lv.kind:<8} {_when(lv.created):<19} {len(lv.processes):>5} {lv.pages_present:>9} "
                  f"{lv.pages_parent:>9} "
                  f"{lv.pages_listed:>9} {zeroed} {_mib(lv.pages_bytes):>8} {_mib(lv.pages_allocated):>9} "
                  f"{frozen}  {lv.path}")
            if args.verbose and len(lv.processes) > 1:
                print(f"     processes (vpids): {' '.join(map(str, lv.processes))}")
            for r in lv.regions or []:
                lazy = f" lazy {r.lazy}" if r.lazy else ""
                print(f"     {r.start:#014x}-{r.end:#014x} {r.pages:>9} pages: present {r.present:>9} "
                      f"parent {r.parent:>9}{lazy}")
    if info.problem:
        from ..errors import ChainError

        raise ChainError(f"the chain ends early: {info.problem}")
    return 0


# ---- decode ----


def cmd_decode(args: argparse.Namespace) -> int:
    from ..images.decode import decode_file, dumps

    text = dumps(decode_file(args.file, pretty=args.pretty), pretty=args.pretty)
    sys.stdout.write(text + "\n")
    return 0


# ---- verify ----


def _verify_structure(top: str, args: argparse.Namespace) -> int:
    from ..chainops.check import check_chain
    from ..chainops.verify import VerifyFailed
    from ..images.chain import tree_vpids

    vpids = tree_vpids(top) if os.path.isdir(top) else []
    reps = [check_chain(top, v) for v in vpids] if len(vpids) > 1 else [check_chain(top)]
    problems = [p for r in reps for p in r.problems]
    many = len(problems) > 1
    if args.json:
        print(json.dumps(reps[0].as_dict() if len(reps) == 1 else {"processes": [r.as_dict() for r in reps]}))
    else:
        for p in problems if many else ():  # one problem is the error line itself
            print(f"problem: {p}")
        if not problems:
            procs = f" of {len(reps)} processes" if len(reps) > 1 else ""
            print(f"{reps[0].top}: chain{procs} of {len(reps[0].levels)} iterations is sound "
                  f"({sum(r.pages_listed for r in reps)} pages listed)")
    if problems:
        raise VerifyFailed(f"{reps[0].top}: {len(problems)} problems in the chain (listed above)" if many
                           else problems[0])
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ..chainops.show import resolve_top
    from ..chainops.verify import VerifyFailed, verify_tree

    top = resolve_top(args.images_dir)
    if args.tree is None:
        return _verify_structure(top, args)
    results = verify_tree(args.tree, top, max_report=args.max_report, single=args.single)
    for res in results:
        if args.json:
            print(json.dumps(res.as_dict()))
            continue
        who = f"pid {res.pid}: " if len(results) > 1 else ""
        for n in res.notes:
            print(f"{who}note: {n}")
        for m in res.first:
            print(f"{who}mismatch: {m}")
        if res.mismatches > len(res.first):
            print(f"{who}... {res.mismatches - len(res.first)} more mismatching pages")
        frozen = "left stopped" if res.was_stopped else f"frozen {res.frozen_s * 1e3:.1f} ms"
        print(f"{who}compared {res.pages_compared} pages ({res.pages_listed} listed in {res.levels} levels), skipped "
              f"{res.pages_skipped} unpopulated, {res.pages_unreadable} unreadable; {res.mismatches} mismatching; "
              f"{res.seconds * 1e3:.0f} ms, {frozen}")
    bad = [r for r in results if not r.ok]
    if bad:
        raise VerifyFailed(bad[0].summary() + (f" (and {len(bad) - 1} more processes differ)" if len(bad) > 1 else ""))
    if not args.json:
        for res in results:
            print(res.summary())
    return 0


# ---- squash ----


def cmd_squash(args: argparse.Namespace) -> int:
    from ..chainops.squash import squash

    r = squash(args.images_dir, args.out)
    if args.json:
        print(json.dumps(r.as_dict()))
    else:
        who = f"{r.processes} processes" if r.processes > 1 else f"pid {r.pid}"
        print(f"{r.out}: {r.pages} pages ({_mib(r.bytes)} MiB) from {r.levels} iterations of {who}, "
              f"{r.seconds * 1e3:.0f} ms")
    return 0


# ---- dedup ----


def cmd_dedup(args: argparse.Namespace) -> int:
    from ..chainops.dedup import dedup

    r = dedup(args.images_dir, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(r.as_dict()))
        return 0
    for lv in r.levels:
        if r.dry_run:
            print(f"{lv.path}: would punch {lv.pages_superseded} superseded pages in {lv.holes} holes "
                  f"({_mib(lv.allocated_before)} MiB allocated)")
        else:
            print(f"{lv.path}: punched {lv.pages_superseded} superseded pages in {lv.holes} holes, freed "
                  f"{lv.bytes_freed} bytes ({_mib(lv.allocated_before)} -> {_mib(lv.allocated_after)} MiB allocated)")
    if r.dry_run:
        from ..ranges import PAGE

        print(f"dry run: {r.pages_superseded} pages ({_mib(r.pages_superseded * PAGE)} MiB at most) would be freed")
    else:
        print(f"freed {r.bytes_freed} bytes ({_mib(r.bytes_freed)} MiB) of {r.pages_superseded} superseded pages "
              f"in {len(r.levels)} parents, {r.seconds * 1e3:.0f} ms")
    return 0


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser, add_command) -> None:
    """Register the commands on written checkpoints on the ``wpdump`` parser (``add_command`` from cli)."""
    sh = add_command(
        sub, "show", "the iterations of a chain, from DIR down its parents",
        "Per iteration: kind, time, pages present / in the parent / listed, pages file size, frozen time of a\n"
        "final dump. -v: contiguous address regions too. DIR may be the directory checkpoint wrote (its\n"
        "highest-numbered iteration is the top).",
        "wpdump show -D ckpt\nwpdump show -D ckpt/2 -v", [common])
    sh.add_argument("-D", "--images-dir", metavar="DIR", help="images directory (the chain's top) or a checkpoint dir")
    sh.add_argument("dir", nargs="?", metavar="DIR", help=argparse.SUPPRESS)  # the old spelling: show DIR
    sh.set_defaults(func=cmd_show, check=lambda a: "name the chain's top with -D DIR"
                    if (a.images_dir is None) == (a.dir is None) else None)

    de = add_command(sub, "decode", "one image file as JSON, as crit decode prints it",
                     "pagemap, inventory and stats images as crit decode shows them (pages-N.img holds raw page\n"
                     "data: nothing to decode).", "wpdump decode ckpt/3/pagemap-1234.img --pretty", [common])
    de.add_argument("file", metavar="FILE", help="image file")
    de.add_argument("--pretty", action="store_true", help="indented, vaddr in hex, flags by name (as crit)")
    de.set_defaults(func=cmd_decode)

    ve = add_command(
        sub, "verify", "check a chain's structure, or compare it with a process",
        "Without -t: a structural check of the chain of every process (exit 1 naming every problem). With -t:\n"
        "freeze the tree (a process already stopped stays stopped), compare every page of every process of the\n"
        "images with the live process it names, resume it. DIR may be the directory checkpoint wrote (its\n"
        "highest-numbered iteration is the top).",
        "wpdump verify -D ckpt\nwpdump verify -t 1234 -D ckpt/3", [common])
    ve.add_argument("-t", "--tree", type=int, metavar="PID",
                    help="root of the process tree to compare with (default: structure only)")
    ve.add_argument("-D", "--images-dir", required=True, metavar="DIR", help="the chain's top, or a checkpoint dir")
    ve.add_argument("--max-report", type=int, default=10, metavar="N", help="mismatching pages to list (10)")
    ve.add_argument("--single", action="store_true", help="-t PID alone, not every process of the images")
    ve.set_defaults(func=cmd_verify)

    sq = add_command(sub, "squash", "one self-contained images dir equal to the chain's top",
                     "Writes OUT: every page of the chain's top in one pages file, PE_PRESENT only, the top's\n"
                     "inventory and stats copied, no parent link (atomic). -o is the log file, as everywhere.",
                     "wpdump squash -D ckpt/3 -O flat", [common])
    sq.add_argument("-D", "--images-dir", required=True, metavar="DIR", help="the chain's top")
    sq.add_argument("-O", "--output-dir", dest="out", metavar="OUT", help="new (or empty) directory to write")
    sq.add_argument("--out", dest="out", help=argparse.SUPPRESS)  # the old spelling (-o is the log file now)
    sq.set_defaults(func=cmd_squash, check=lambda a: None if a.out else
                    "the output directory is required: -O/--output-dir OUT (-o is the log file)")

    dd = add_command(sub, "dedup", "punch superseded pages out of the parents (like criu dedup)", DEDUP_HELP.rstrip(),
                     "wpdump dedup -D ckpt/3 --dry-run\nwpdump dedup -D ckpt/3", [common])
    dd.add_argument("-D", "--images-dir", required=True, metavar="DIR", help="the chain's top")
    dd.add_argument("--dry-run", action="store_true", help="only report what would be punched")
    dd.set_defaults(func=cmd_dedup)
