"""The action script the source gives ``criu dump``: wpdump's hook where it is wanted, and the moment of the freeze.

CRIU execs its action script at every step (without a shell): ``pre-dump`` before it freezes the tree, ``post-dump``
inside the frozen window. A shell that exits at once for the other steps keeps a Python start-up out of the frozen
window; after ``pre-dump`` it records the time (the freeze follows), which starts the downtime.
"""

from __future__ import annotations

import contextlib
import os
import shlex

SCRIPT = """#!/bin/sh
case "$CRTOOLS_SCRIPT_ACTION" in
pre-dump) {hook}; date +%s.%N > {stamp};;
post-dump) {post};;
esac
exit 0
"""


def write(staging: str, hook: str, rewrite: bool) -> tuple[str, str]:
    """Write the script into ``staging``; ``rewrite``: the hook's post-dump rewrite runs too (plain dump), else not
    (lazy dump: the pages are still in CRIU's pipes). Returns the script's and the freeze stamp's paths."""
    script, stamp = os.path.join(staging, "criu-action"), os.path.join(staging, "frozen-at")
    q = shlex.quote(hook)
    with open(script, "w") as f:
        f.write(SCRIPT.format(hook=q, stamp=shlex.quote(stamp), post=f"exec {q}" if rewrite else "exit 0"))
    os.chmod(script, 0o700)
    return script, stamp


def frozen_at(stamp: str) -> float | None:
    """The wall-clock time (time.time()) the pre-dump step ended, None if it did not run."""
    with contextlib.suppress(OSError, ValueError), open(stamp) as f:
        return float(f.read().strip())
    return None
