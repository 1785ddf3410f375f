"""The whole checkpoint loop: pre-dumps into DIR/1, DIR/2, … chained by ``parent`` until the
convergence policy says stop, then the final dump into the next numbered directory."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

from ..images import imgdir
from . import iteration
from .convergence import Convergence, PHaulPolicy
from .iteration import IterationResult
from .pages import Progress


def checkpoint(
    pid: int, images_dir: str, policy: Convergence | None = None, *, interval: float = 0.0,
    leave_stopped: bool = False, keep_tracking: bool = False,
    on_iteration: Callable[[IterationResult, str | None], None] | None = None, progress: Progress | None = None,
    **iteration_kw: bool,
) -> list[IterationResult]:
    """Run pre-dumps then the final dump; returns every iteration's result (the last is the dump).
    ``iteration_kw`` go to every iteration (allow_userfaultfd_target, allow_unreadable)."""
    policy = policy or PHaulPolicy()
    dest = imgdir.check_destination(images_dir)
    created = not os.path.exists(dest)
    os.makedirs(dest, mode=0o700, exist_ok=True)
    try:
        return _loop(pid, dest, policy, interval, leave_stopped, keep_tracking, on_iteration, progress, iteration_kw)
    except BaseException:
        if created:  # failed or interrupted before the first iteration was written: no empty DIR left
            with contextlib.suppress(OSError):
                os.rmdir(dest)
        raise


def _loop(
    pid: int, dest: str, policy: Convergence, interval: float, leave_stopped: bool, keep_tracking: bool,
    on_iteration: Callable[[IterationResult, str | None], None] | None, progress: Progress | None,
    iteration_kw: dict[str, bool],
) -> list[IterationResult]:
    history: list[IterationResult] = []
    reason = None
    while reason is None:
        n = len(history) + 1
        if history and interval > 0:
            time.sleep(interval)
        res = iteration.pre_dump(pid, os.path.join(dest, str(n)), f"../{n - 1}" if history else None,
                                 progress=progress, **iteration_kw)
        history.append(res)
        reason = policy.stop_reason(history)
        if on_iteration is not None:
            on_iteration(res, reason)
    n = len(history) + 1
    res = iteration.dump(pid, os.path.join(dest, str(n)), f"../{n - 1}", leave_stopped=leave_stopped,
                         keep_tracking=keep_tracking, progress=progress, **iteration_kw)
    history.append(res)
    if on_iteration is not None:
        on_iteration(res, None)
    return history
