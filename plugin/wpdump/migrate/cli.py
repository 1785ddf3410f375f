"""``wpdump serve`` and ``wpdump migrate``: thin over serve.py and source.py."""

from __future__ import annotations

import argparse
import json


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    return serve(args.images_dir, args.address, args.port, once=args.once, restore_args=args.restore_arg or [],
                 out=lambda s: print(s, flush=True))


def cmd_migrate(args: argparse.Namespace) -> int:
    from ..dump.convergence import LXDPolicy, PHaulPolicy
    from .source import migrate, summary_lines

    policy = (LXDPolicy(max_iterations=args.max_iterations) if args.policy == "lxd"
              else PHaulPolicy(max_iterations=args.max_iterations))
    out = (lambda s: None) if args.json else (lambda s: print(s, flush=True))
    s = migrate(args.tree, args.address, args.port, policy, work_dir=args.work_dir, timeout=args.timeout,
                lazy_pages=not args.no_lazy_pages, out=out)
    if args.json:
        print(json.dumps(s.as_dict()))
    else:
        for line in summary_lines(s):
            print(line)
    return 0


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser, add_command) -> None:
    """Register serve and migrate on the ``wpdump`` parser (``add_command`` from cli)."""
    sv = add_command(
        sub, "serve", "receive live migrations and restore them with CRIU (the destination)",
        "Listens on ADDR:PORT only. Each migration's iterations arrive in CRIU's page-server protocol and are\n"
        "written under DIR in a hidden directory; after the final one it runs `criu restore -d` (in this\n"
        "command's network namespace), answers the restored root pid, and renames the chain to\n"
        "DIR/migration-DATE-TIME. A failed or garbage stream leaves nothing in DIR. One migration at a time.",
        "wpdump serve -D /var/lib/wpdump/in --address 10.0.0.2 --port 7070", [common])
    sv.add_argument("-D", "--images-dir", required=True, metavar="DIR", help="where migrations are written")
    sv.add_argument("--address", required=True, metavar="ADDR", help="address to listen on")
    sv.add_argument("--port", required=True, type=int, metavar="PORT", help="TCP port (0: any, printed)")
    sv.add_argument("--once", action="store_true", help="exit after one migration (status 1 if it failed)")
    sv.add_argument("--restore-arg", action="append", metavar="ARG",
                    help="extra argument for criu restore (repeatable), e.g. --restore-arg=--tcp-established")
    sv.set_defaults(func=cmd_serve)

    mg = add_command(
        sub, "migrate", "move a running process tree to `wpdump serve` on another host (pre-copy)",
        "Pre-dumps stream to the destination while the tree runs, until the convergence policy stops them; then\n"
        "`criu dump --leave-stopped` with wpdump's hook (only what changed since the last pre-dump) is sent and\n"
        "restored there. The tree here ends only when the destination answers with the restored pid; on any\n"
        "failure before that it resumes, and one line says why. One line per iteration, then total time, bytes\n"
        "and the downtime by part.",
        "wpdump migrate -t 1234 --address 10.0.0.2 --port 7070 --max-iterations 5", [common])
    mg.add_argument("-t", "--tree", type=int, required=True, metavar="PID", help="root of the process tree")
    mg.add_argument("--address", required=True, metavar="ADDR", help="destination address")
    mg.add_argument("--port", required=True, type=int, metavar="PORT", help="destination port")
    mg.add_argument("--policy", choices=("phaul", "lxd"), default="phaul", help="convergence policy (phaul)")
    mg.add_argument("--max-iterations", type=int, default=8, metavar="N", help="pre-dumps at most (8)")
    mg.add_argument("--timeout", type=float, default=600.0, metavar="SEC",
                    help="give up when the destination says nothing for SEC seconds (600)")
    mg.add_argument("--no-lazy-pages", action="store_true",
                    help="final dump by plain criu dump + wpdump's hook instead of criu dump --lazy-pages + fetching "
                    "only the dirty pages")
    mg.add_argument("--work-dir", metavar="DIR", help="local staging of the iterations (/var/tmp)")
    mg.set_defaults(func=cmd_migrate)
