"""The process tree rooted at a pid (CRIU's ``-t PID``): its processes, their pids inside the tree's pid namespace.

A tree is read from /proc/PID/task/TID/children of every thread. Zombies hold no memory and are left out. Each
process is named by its pid in the root's innermost pid namespace (a container's init is 1 there), as CRIU names
its images.
"""

from __future__ import annotations

import errno
import logging
from typing import NamedTuple

from ..errors import NoSuchProcess, TrackerError, WpdumpError
from .native import same_mm
from .process import list_proc, read_proc_text, read_stat

log = logging.getLogger("wpdump.tree")

GONE = ("Z", "X", "x")


class Member(NamedTuple):
    """One process of a tree."""

    pid: int  # in the caller's pid namespace
    vpid: int  # in the root's innermost pid namespace
    ppid: int  # the parent's pid (caller's namespace); 0 for the root
    start_ticks: int

    @property
    def key(self) -> str:
        """PID-STARTTICKS: the process's identity (a pid alone is reused)."""
        return f"{self.pid}-{self.start_ticks}"


def nspids(pid: int) -> list[int]:
    """The pids of ``pid`` in each pid namespace it belongs to, outermost first (NSpid of /proc/PID/status)."""
    for line in read_proc_text(pid, "status").splitlines():
        if line.startswith("NSpid:"):
            return [int(x) for x in line.split()[1:]]
    return [pid]  # a kernel without NSpid has no nested pid namespaces to name


def children(pid: int) -> list[int]:
    """The children of every thread of ``pid`` (the process's children), sorted; [] when it is gone."""
    out: set[int] = set()
    try:
        tids = list_proc(pid, "task")
    except NoSuchProcess:
        return []
    for tid in tids:
        text = read_proc_text(pid, f"task/{tid}/children", "")
        out.update(int(c) for c in text.split())
    return sorted(out)


def _member(pid: int, ppid: int, level: int) -> Member | None:
    """``pid`` as a member (None when it is gone or a zombie)."""
    try:
        st = read_stat(pid)
        ns = nspids(pid)
    except NoSuchProcess:
        return None
    if st.state in GONE:
        return None
    if len(ns) <= level:  # cannot happen for a descendant: its pid namespace is the root's or nested in it
        raise TrackerError(f"pid {pid} is outside the tree's pid namespace", pid=pid, errno=errno.EINVAL)
    return Member(pid, ns[level], ppid, st.start_ticks)


def _shares_mm(parent: int, child: int) -> bool:
    try:
        return same_mm(parent, child)
    except NoSuchProcess:
        return False  # gone: the next read of the tree leaves it out


def read_tree(root: int, single: bool = False) -> list[Member]:
    """The live processes of the tree rooted at ``root``, root first then breadth first (``single``: the root
    alone). Raises NoSuchProcess when the root is gone."""
    level = len(nspids(root)) - 1
    first = _member(root, 0, level)
    if first is None:
        raise NoSuchProcess(f"target {root} exited", pid=root, errno=errno.ESRCH)
    out = [first]
    if single:
        return out
    seen = {root}
    i = 0
    while i < len(out):
        parent = out[i].pid
        i += 1
        for c in children(parent):
            if c in seen:
                continue
            seen.add(c)
            try:
                m = _member(c, parent, level)
            except WpdumpError:
                continue
            if m is not None and _shares_mm(parent, c):
                # a vfork (CLONE_VM) child runs in its parent's address space until it execs or exits: that
                # memory is the parent's, tracked and dumped there (docs/kernel.md rule 34)
                log.info("pid %d shares the address space of its parent %d (vfork): dumped with it", c, parent)
                continue
            if m is not None:
                out.append(m)
    return out
