"""``wpdump-criu``'s command line: CRIU's, with the memory-tracking commands answered by wpdump.

- ``swrk FD``: the RPC session (rpc.py);
- ``pre-dump -t PID -D DIR [--prev-images-dir P] [--track-mem] [-o LOG] [-W WORKDIR]``: wpdump's pre-dump;
- ``dump ... --track-mem --prev-images-dir P``: the real CRIU's dump without both, with wpdump's criu hook as
  its action script (it rewrites the pagemaps against the chain at post-dump);
- ``check --feature mem_dirty_track``: yes where userfaultfd can track (other features: the real CRIU);
- anything else: the real CRIU, exec'd with the same arguments.

``--criu-bin PATH`` (first argument only, removed before CRIU sees the rest) or $WPDUMP_REAL_CRIU names the
real CRIU.
"""

from __future__ import annotations

import os
import shutil
import sys

from ..errors import WpdumpError
from . import realcriu
from .criulog import Log

MEM_FEATURE = "mem_dirty_track"
COMMANDS = {"dump", "pre-dump", "restore", "show", "check", "page-server", "service", "swrk", "lazy-pages",
            "cpuinfo", "exec", "dedup"}
# the options whose values wpdump-criu reads (any other argument passes through untouched)
_NAMES = {"-t": "tree", "--tree": "tree", "-D": "images", "--images-dir": "images", "-o": "log",
          "--log-file": "log", "-W": "work", "--work-dir": "work", "--prev-images-dir": "prev",
          "--feature": "feature"}


def _split(args: list[str]) -> tuple[str | None, dict[str, list[str]], list[str]]:
    """The command (the first CRIU command name), the values of the options we read, and the arguments
    without the command."""
    command = None
    vals: dict[str, list[str]] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if command is None and a in COMMANDS:
            command = a
            i += 1
            continue
        rest.append(a)
        key, eq, v = a.partition("=") if a.startswith("--") else (a[:2], "", a[2:])
        if key in _NAMES:
            if not eq and not v and i + 1 < len(args):
                i += 1
                v = args[i]
                rest.append(v)
            vals.setdefault(_NAMES[key], []).append(v)
        i += 1
    return command, vals, rest


def _exec(real: str, args: list[str]) -> None:
    os.execv(real, [real, *args])


def _check_features(real: str, args: list[str], features: list[str]) -> int:
    """``check --feature mem_dirty_track`` answered here; other features asked of the real CRIU."""
    from ..target import uffd

    try:
        missing = uffd.missing_features()
    except OSError as e:
        missing = [f"userfaultfd ({e.strerror})"]
    if missing:
        print(f"wpdump-criu: {MEM_FEATURE} is not supported: the kernel lacks {missing[0]}", file=sys.stderr)
        return 1
    others = [f for f in features if f != MEM_FEATURE]
    if not others:
        print(f"{MEM_FEATURE} is supported")
        return 0
    keep: list[str] = []
    skip = False
    for i, a in enumerate(args):  # drop "--feature mem_dirty_track" / "--feature=mem_dirty_track"
        if skip:
            skip = False
            continue
        if a == f"--feature={MEM_FEATURE}" or a == "--feature" and i + 1 < len(args) and args[i + 1] == MEM_FEATURE:
            skip = a == "--feature"
            continue
        keep.append(a)
    _exec(real, ["check", *keep])
    return 1


def _pre_dump(vals: dict[str, list[str]]) -> int:
    from .predump import run_pre_dump

    log = Log()
    try:
        pid = int(vals["tree"][-1])
        images = os.path.abspath(vals.get("images", ["."])[-1])
    except (KeyError, ValueError):
        print("Error (wpdump-criu): pre-dump needs -t PID", file=sys.stderr)
        return 1
    work = os.path.abspath(vals.get("work", [images])[-1])
    name = vals.get("log", [None])[-1]
    if name and name != "-":
        log.path = name if os.path.isabs(name) else os.path.join(work, name)
    err = run_pre_dump(pid, images, vals.get("prev", [None])[-1], log)
    if log.path is None:
        sys.stderr.writelines(log.lines)
    log.flush()
    if err is not None:
        print(f"Error (wpdump-criu): {err[0]}", file=sys.stderr)
        return 1
    return 0


def _dump(real: str, rest: list[str]) -> None:
    """CRIU's dump without --track-mem / --prev-images-dir, wpdump's hook as action script."""
    # next to the interpreter (a venv's bin): wpdump-criu may run as a `criu` link elsewhere in PATH
    hook = os.path.join(os.path.dirname(sys.executable), "wpdump-criu-hook")
    if not os.access(hook, os.X_OK):
        hook = shutil.which("wpdump-criu-hook") or hook
    out: list[str] = []
    skip = False
    for a in rest:
        if skip:
            skip = False
            continue
        if a == "--track-mem" or a.startswith("--prev-images-dir="):
            continue
        if a == "--prev-images-dir":
            skip = True
            continue
        out.append(a)
    _exec(real, ["dump", *out, "--action-script", hook])


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    setting = None
    if args and args[0].startswith("--criu-bin"):
        if args[0] == "--criu-bin" and len(args) > 1:
            setting = args[1]
            args = args[2:]
        else:
            setting = args[0].partition("=")[2]
            args = args[1:]
    try:
        real = realcriu.find(setting)
    except WpdumpError as e:
        print(f"Error (wpdump-criu): {e}", file=sys.stderr)
        return 1
    command, vals, rest = _split(args)
    try:
        if command == "swrk" and rest and rest[-1].isdigit():
            from . import rpc

            return rpc.serve(int(rest[-1]), real)
        if command == "pre-dump":
            return _pre_dump(vals)
        if command == "dump" and "--track-mem" in args and vals.get("prev"):
            _dump(real, rest)
        if command == "check" and MEM_FEATURE in vals.get("feature", []):
            return _check_features(real, rest, vals["feature"])
        _exec(real, args)
    except WpdumpError as e:
        print(f"Error (wpdump-criu): {e}", file=sys.stderr)
    except OSError as e:
        print(f"Error (wpdump-criu): {real}: {e.strerror}", file=sys.stderr)
    return 1
