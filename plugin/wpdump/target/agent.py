"""The ptrace agent: a child process that seizes the target for one command and does every ptrace operation.

The wpdump command never traces the target itself. The agent ignores SIGINT/SIGTERM/SIGHUP, leads its own
session (a terminal's ^C does not reach it) and finishes any operation it has begun: when the command dies,
even by SIGKILL, the agent sees the socket close, puts back what it changed and detaches, and the target runs
on. Only a SIGKILL of the agent itself while it runs an injected syscall can still harm the target.
"""

from __future__ import annotations

import errno
import os
import signal
import socket

from .. import errors, signals
from ..errors import TrackerError, WpdumpError
from ..ipc import recv_msg, send_msg
from .native import rseq_area


def _error(e: BaseException) -> dict:
    if isinstance(e, WpdumpError):
        return {"error": type(e).__name__, "msg": str(e), "pid": e.pid, "errno": e.errno}
    return {"error": "TrackerError", "msg": f"ptrace agent: {type(e).__name__}: {e}", "pid": None, "errno": None}


def _raise(h: dict) -> None:
    cls = getattr(errors, h["error"], TrackerError)
    if not (isinstance(cls, type) and issubclass(cls, WpdumpError)) or cls is errors.KernelUnsupported:
        cls = TrackerError
    raise cls(h["msg"], pid=h["pid"], errno=h["errno"])


def _rseq(sz) -> list[tuple[int, int]]:
    areas = []
    for th in sz.threads.values():
        if not th.stopped:
            continue
        try:
            area = rseq_area(th.tid)
        except WpdumpError:
            continue
        if area is not None:
            areas.append(area)
    return areas


def _serve(sock: socket.socket, pid: int, mask: set[signal.Signals]) -> None:
    from .inject import inject_madvise, inject_userfaultfd
    from .ptrace import Seizure

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGPIPE, signal.SIGTSTP,
              signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    keep = sock.fileno()
    os.closerange(3, keep)  # the command's fds (its userfaultfd, keeper sockets, locks) are not ours to hold
    os.closerange(keep + 1, 1 << 16)
    seized: dict[int, Seizure] = {}
    try:
        while True:
            try:
                header, _, fds = recv_msg(sock)
            except (EOFError, OSError):
                return  # the command is gone: release below
            for fd in fds:
                os.close(fd)
            op, reply, out = header["op"], {"ok": True}, -1
            tp = header.get("pid", pid)
            try:
                sz = seized.get(tp)
                if op == "seize":
                    if sz is None:
                        sz = Seizure(tp)
                        seized[tp] = sz  # released below even when the seize fails half-way
                        sz.seize_all() if header["all"] else sz.seize_one()
                elif op == "release":
                    leave = header["leave_stopped"]
                    for p in [tp] if "pid" in header else list(seized):
                        s = seized.pop(p, None)
                        if s is not None:
                            s.release(leave)
                elif sz is None:
                    raise TrackerError(f"pid {tp}: not seized", pid=tp, errno=errno.EINVAL)
                elif op == "userfaultfd":
                    out = inject_userfaultfd(sz)
                elif op == "madvise":
                    reply["failed"] = inject_madvise(sz, header["ranges"], header["advice"])
                elif op == "rseq":
                    reply["areas"] = _rseq(sz)
            except BaseException as e:  # noqa: BLE001 - every failure goes back to the command
                reply = _error(e)
                if op == "seize":
                    s = seized.pop(tp, None)
                    if s is not None:
                        s.release()
            try:
                send_msg(sock, reply, fds=(out,) if out >= 0 else ())
            except OSError:
                pass
            finally:
                if out >= 0:
                    os.close(out)
            if (op == "release" and "pid" not in header) or (op == "seize" and header.get("first") and not seized):
                return  # released everything, or the first seize failed
    finally:
        for s in seized.values():
            s.release()


class Agent:
    """The command's handle on its ptrace agent for ``pid``: every thread seized (``all_threads``) or one.
    More processes can be seized by the same agent (:meth:`seize`): a tree is frozen by one agent."""

    def __init__(self, pid: int, *, all_threads: bool) -> None:
        self.pid = pid
        self.pids = [pid]
        self.released = False
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Held across the fork: a Ctrl-C landing in an at-fork handler (logging's) would be swallowed as
        # "Exception ignored", and one reaching the agent before it ignores them would kill it.
        with signals.held() as old:
            self.child = os.fork()
            if self.child == 0:  # pragma: no cover - runs in the agent
                code = 1
                try:
                    ours.close()
                    _serve(theirs, pid, old)
                    code = 0
                finally:
                    os._exit(code)
            theirs.close()
            self.sock = ours
        try:
            self.request("seize", all=all_threads, first=True)
        except BaseException:
            self.released = True  # the agent exits after a failed seize
            self.close()
            raise

    def request(self, op: str, **kw: object) -> tuple[dict, list[int]]:
        try:
            send_msg(self.sock, {"op": op, **kw})
            header, _, fds = recv_msg(self.sock)
        except (EOFError, OSError) as e:
            why = str(e) or "it closed the connection"
            raise TrackerError(f"pid {self.pid}: the ptrace agent died ({why})", pid=self.pid,
                               errno=errno.EPIPE) from None
        if "error" in header:
            for fd in fds:
                os.close(fd)
            _raise(header)
        return header, fds

    def seize(self, pid: int, *, all_threads: bool) -> None:
        """Seize one more process (of a tree frozen by this agent); a failure leaves the others seized."""
        self.request("seize", pid=pid, all=all_threads)
        self.pids.append(pid)

    def userfaultfd(self, pid: int | None = None) -> int:
        """A userfaultfd created inside the target (the target keeps no copy)."""
        _, fds = self.request("userfaultfd", pid=pid or self.pid)
        return fds[0]

    def madvise(self, ranges: list[tuple[int, int]], advice: int, pid: int | None = None) -> list[tuple[int, int]]:
        """madvise(advice) inside the target on each range; returns the ranges where it failed."""
        h, _ = self.request("madvise", ranges=ranges, advice=advice, pid=pid or self.pid)
        return [tuple(r) for r in h["failed"]]

    def rseq_areas(self, pid: int | None = None) -> list[tuple[int, int]]:
        h, _ = self.request("rseq", pid=pid or self.pid)
        return [tuple(a) for a in h["areas"]]

    def release_one(self, pid: int) -> None:
        """Detach from one process; the agent stays for the others (and for more seizes)."""
        self.request("release", pid=pid, leave_stopped=False)
        if pid in self.pids:
            self.pids.remove(pid)

    def release(self, leave_stopped: bool = False) -> None:
        """Detach from every seized process (left in a group stop with ``leave_stopped``); the agent exits."""
        if not self.released:
            self.released = True
            self.request("release", leave_stopped=leave_stopped)

    def close(self) -> None:
        try:
            if not self.released:
                self.release()
        except WpdumpError:
            pass
        finally:
            self.sock.close()
            try:
                os.waitpid(self.child, 0)
            except ChildProcessError:
                pass

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
