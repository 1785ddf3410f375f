"""The keeper: a small process per tracked tree that holds its userfaultfds between separate invocations.

``wpdump pre-dump`` runs are separate commands (like CRIU's), but write tracking must go on between
them. The keeper of a tree (named by its root) owns one userfaultfd and the tracker's exported state per
process of the tree; an invocation checks them all out over a unix socket (the fds travel with
SCM_RIGHTS), harvests, writes its iteration, and checks the tree's new set of processes back in. A keeper
exits when the root exits, on ``untrack``, or when an invocation that checked the trackers out
disappears without checking them back in: their dirty information may be lost, so the next iteration
must start tracking afresh (a full iteration). Closing a userfaultfd unprotects its process.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from .. import signals
from ..errors import NoSuchProcess, WpdumpError
from ..ipc import recv_msg, send_msg
from ..target.process import read_stat


class KeeperError(WpdumpError):
    """The keeper of a pid could not be reached or refused a request."""


class RunDirError(KeeperError):
    """The run directory is missing, not ours, or writable by others: refused."""


def default_run_dir() -> str:
    """/run/wpdump for root; else $XDG_RUNTIME_DIR/wpdump, or /tmp/wpdump-UID without it."""
    if os.geteuid() == 0:
        return "/run/wpdump"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg) and os.path.isdir(xdg):
        return os.path.join(xdg, "wpdump")
    return f"/tmp/wpdump-{os.geteuid()}"


def run_dir() -> str:
    """Where keepers put their sockets, locks and logs: $WPDUMP_RUN_DIR or :func:`default_run_dir`.

    Created 0700 if missing; refused unless it is a real directory owned by this user and writable by no one
    else (another user could plant a symlink or a socket of theirs in it)."""
    d = os.path.abspath(os.environ.get("WPDUMP_RUN_DIR") or default_run_dir())
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        st = os.lstat(d)
    except OSError as e:
        raise RunDirError(f"run directory {d}: {e.strerror} (set WPDUMP_RUN_DIR to a directory of your own)",
                          errno=e.errno) from None
    why = None
    if not stat.S_ISDIR(st.st_mode):
        why = "is not a directory" + (" (a symlink)" if stat.S_ISLNK(st.st_mode) else "")
    elif st.st_uid != os.geteuid():
        why = f"is owned by uid {st.st_uid}, not by uid {os.geteuid()}"
    elif st.st_mode & 0o022:
        why = f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    if why:
        raise RunDirError(f"run directory {d} {why}: refusing it (WPDUMP_RUN_DIR must name a directory of your "
                          "own, mode 0700)", errno=errno.EPERM)
    return d


def key(pid: int, start_ticks: int | None = None) -> str:
    """The name of a process in the run directory: PID-STARTTICKS (a pid alone is reused, and pids of
    different pid namespaces collide). Raises NoSuchProcess when ``pid`` is gone and no ticks are given."""
    if start_ticks is None:
        start_ticks = read_stat(pid).start_ticks
    return f"{pid}-{start_ticks}"


def _path(pid: int, suffix: str, start_ticks: int | None = None) -> str:
    return os.path.join(run_dir(), key(pid, start_ticks) + suffix)


def socket_path(pid: int, start_ticks: int | None = None) -> str:
    return _path(pid, ".sock", start_ticks)


def open_log(path: str) -> int:
    """Open (append, create 0600) a log file in the run directory, never through a symlink."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


# ---- the keeper process ----


@dataclass
class Member:
    """The tracker of one process of the tree, as the keeper holds it."""

    pid: int
    start_ticks: int
    uffd: int
    state: bytes


@dataclass
class _Held:
    pid: int  # the root
    start_ticks: int
    members: list[Member] = field(default_factory=list)
    iteration: str = ""
    images_dir: str = ""
    since: float = 0.0
    checkins: int = 0  # iterations written since tracking started
    restores: int = 0  # restore-memory runs since
    holder: socket.socket | None = None


def _serve(held: _Held, listener: socket.socket, pidfd: int, path: str) -> str:
    """Answer requests until the keeper must exit; returns why, with the userfaultfds closed and the socket
    unlinked before the connections close: an untrack waits for its connection's end to know both are done."""
    conns: list[socket.socket] = []
    try:
        return _answer(held, listener, pidfd, conns)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        _release(held)
        for c in conns:
            c.close()


def _release(held: _Held) -> None:
    """Close every userfaultfd: each write-protection is gone when close() returns (docs/kernel.md rule 35), and
    the tree runs on unprotected."""
    for m in held.members:
        os.close(m.uffd)
    held.members = []


def _answer(held: _Held, listener: socket.socket, pidfd: int, conns: list[socket.socket]) -> str:
    while True:
        ready, _, _ = select.select([listener, pidfd, *conns], [], [])
        if pidfd in ready:
            return "target exited"
        if listener in ready:
            c, _ = listener.accept()
            uid = struct.unpack("3i", c.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
            if uid not in (0, os.getuid()):
                c.close()
            else:
                c.settimeout(30)
                conns.append(c)
        for c in [c for c in conns if c in ready]:
            try:
                header, payload, fds = recv_msg(c)
            except (EOFError, OSError, ValueError):
                conns.remove(c)
                c.close()
                if c is held.holder:
                    return "the invocation that checked the tracker out ended without checking it in"
                continue
            why = _handle(held, c, header, payload, fds)
            if why:
                return why


def _members_of(header: dict, payload: bytes, fds: list[int]) -> list[Member] | None:
    """The members a checkin sends (states cut from the payload), or None when it does not add up."""
    rows = header.get("members")
    if not isinstance(rows, list) or len(rows) != len(fds):
        return None
    out, pos = [], 0
    for r, fd in zip(rows, fds, strict=True):
        n = int(r["size"])
        out.append(Member(int(r["pid"]), int(r["start_ticks"]), fd, payload[pos : pos + n]))
        pos += n
    return out if pos == len(payload) else None


def _handle(held: _Held, c: socket.socket, header: dict, payload: bytes, fds: list[int]) -> str:
    op = header.get("op")
    if op != "checkin":
        for fd in fds:  # only a checkin carries fds
            os.close(fd)
    if op == "status":
        send_msg(c, {
            "ok": True, "pid": held.pid, "start_ticks": held.start_ticks, "iteration": held.iteration,
            "images_dir": held.images_dir, "since": held.since, "checkins": held.checkins, "restores": held.restores,
            "busy": held.holder is not None, "keeper": os.getpid(),
            "members": [[m.pid, m.start_ticks] for m in held.members],
        })
    elif op == "checkout":
        if held.holder is not None:
            send_msg(c, {"ok": False, "error": "the tracker is checked out by another invocation"})
        else:
            held.holder = c
            rows = [{"pid": m.pid, "start_ticks": m.start_ticks, "size": len(m.state)} for m in held.members]
            send_msg(c, {"ok": True, "iteration": held.iteration, "members": rows},
                     b"".join(m.state for m in held.members), tuple(m.uffd for m in held.members))
    elif op == "drop":  # the holder tracks one process afresh: the keeper's copy of its userfaultfd must go too
        if c is not held.holder:
            send_msg(c, {"ok": False, "error": "drop without checkout"})
            return ""
        keep = []
        for m in held.members:
            if (m.pid, m.start_ticks) == (header.get("pid"), header.get("start_ticks")):
                os.close(m.uffd)
            else:
                keep.append(m)
        held.members = keep
        send_msg(c, {"ok": True})
    elif op == "giveback":  # the checkout changed nothing
        if c is held.holder:
            held.holder = None
        send_msg(c, {"ok": True})
    elif op == "checkin":
        members = _members_of(header, payload, fds)
        if (c is not held.holder and held.members) or members is None:
            for fd in fds:
                os.close(fd)
            send_msg(c, {"ok": False, "error": "checkin without checkout" if members is not None
                         else "malformed checkin"})
            return ""
        for m in held.members:
            os.close(m.uffd)
        held.members = members
        held.iteration = header["iteration"]
        held.images_dir, held.holder = header.get("images_dir", ""), None
        if header.get("kind") == "restore":
            held.restores += 1
        else:
            held.checkins += 1
        send_msg(c, {"ok": True})
    elif op == "untrack":
        send_msg(c, {"ok": True})
        return "untracked"
    else:
        send_msg(c, {"ok": False, "error": f"unknown request {op!r}"})
    return ""


def keeper_main(argv: list[str] | None = None) -> int:
    """Entry point of the keeper process (started by :func:`spawn`)."""
    p = argparse.ArgumentParser(prog="wpdump-keeper")
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--start-ticks", type=int, required=True)
    p.add_argument("--ready", type=int, required=True)
    a = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals.ENDING)  # spawned with them held (see spawn): SIGTERM ends it
    path = socket_path(a.pid, a.start_ticks)
    held = _Held(a.pid, a.start_ticks, since=time.time())
    try:
        pidfd = os.pidfd_open(a.pid)
    except OSError as e:
        os.write(a.ready, f"pidfd_open: {e.strerror}".encode())
        return 1
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # stale: the caller holds the pid's lock, so no live keeper owns it
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o077)
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    listener.listen(8)
    os.write(a.ready, b"ok")
    os.close(a.ready)
    why = "?"
    try:
        why = _serve(held, listener, pidfd, path)
    finally:
        print(f"{time.strftime('%F %T')} keeper of pid {a.pid} exits: {why}", file=sys.stderr, flush=True)
    # a clean exit leaves nothing behind (an exception above leaves its traceback in the log)
    with contextlib.suppress(OSError):
        os.unlink(_path(a.pid, ".log", a.start_ticks))
    return 0


# ---- the client side ----


@contextlib.contextmanager
def pid_lock(pid: int) -> Iterator[None]:
    """Serialise invocations working on one process (an iteration, untrack, verify, restore-memory).

    The lock file exists only while it is held: it is unlinked before it is unlocked, and a locker checks
    after flock that the path still names the inode it locked (else it locked a file already unlinked by
    the previous holder, and tries again)."""
    path = _path(pid, ".lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise KeeperError(
                f"another wpdump invocation is working on pid {pid}", pid=pid, errno=errno.EBUSY
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.lstat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


class Keeper:
    """A connection to the keeper of one pid."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock

    @classmethod
    def connect(cls, pid: int) -> Keeper | None:
        """The keeper of ``pid``, or None when there is none (or the process is gone)."""
        try:
            path = socket_path(pid)
        except NoSuchProcess:
            return None
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(30)
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            return None
        return cls(pid, s)

    def close(self) -> None:
        self.sock.close()

    def _request(self, header: dict, payload: bytes = b"", fds: tuple[int, ...] = ()) -> tuple[dict, bytes, list]:
        try:
            send_msg(self.sock, header, payload, fds)
            reply, data, rfds = recv_msg(self.sock)
        except (EOFError, OSError) as e:
            raise KeeperError(f"keeper of pid {self.pid} went away", pid=self.pid, errno=errno.EPIPE) from e
        if not reply.get("ok"):
            for fd in rfds:
                os.close(fd)
            raise KeeperError(f"keeper of pid {self.pid}: {reply.get('error')}", pid=self.pid, errno=errno.EBUSY)
        return reply, data, rfds

    def status(self) -> dict:
        return self._request({"op": "status"})[0]

    def checkout(self) -> tuple[str, list[Member]]:
        """Take the trackers: (iteration they last wrote, one Member per process with a dup of its userfaultfd)."""
        reply, state, fds = self._request({"op": "checkout"})
        members = _members_of(reply, state, fds)
        if members is None:
            for fd in fds:
                os.close(fd)
            raise KeeperError(f"keeper of pid {self.pid} sent a malformed checkout", pid=self.pid, errno=errno.EPROTO)
        return reply["iteration"], members

    def drop(self, pid: int, start_ticks: int) -> None:
        """Close the keeper's copy of one process's userfaultfd (while checked out): it is tracked afresh."""
        self._request({"op": "drop", "pid": pid, "start_ticks": start_ticks})

    def giveback(self) -> None:
        """Give back what :meth:`checkout` took, unchanged (tracking goes on as before)."""
        self._request({"op": "giveback"})

    def checkin(self, members: list[Member], iteration: str, images_dir: str, kind: str = "iteration") -> None:
        """Give the trackers of the tree's processes back; ``kind`` "restore" (restore-memory) is not counted as
        an iteration."""
        rows = [{"pid": m.pid, "start_ticks": m.start_ticks, "size": len(m.state)} for m in members]
        self._request({"op": "checkin", "iteration": iteration, "images_dir": images_dir, "kind": kind,
                       "members": rows}, b"".join(m.state for m in members), tuple(m.uffd for m in members))

    def untrack(self, wait: bool = True) -> None:
        """End tracking: the keeper closes the userfaultfds (the tree runs unprotected) and exits; ``wait`` for
        that (without, the caller goes on while the kernel drops the write-protection: tens of ms a GiB)."""
        self._request({"op": "untrack"})
        if not wait:
            return
        # Wait for the keeper process to end: its exit closes this connection, after the userfaultfd (so that a
        # new tracker of this pid finds no registration left, and a new keeper can bind the socket).
        self.sock.settimeout(10)
        try:
            while self.sock.recv(4096):
                pass
        except OSError:
            pass


def spawn(pid: int, start_ticks: int, members: list[Member], iteration: str, images_dir: str) -> Keeper:
    """Start a keeper for the tree rooted at ``pid`` and check ``members`` in. Call under pid_lock."""
    r, w = os.pipe()
    log_path = _path(pid, ".log", start_ticks)
    try:
        logfd = open_log(log_path)
    except OSError as e:
        raise KeeperError(f"keeper of pid {pid} did not start: cannot open its log {log_path}: {e.strerror}",
                          pid=pid, errno=e.errno) from None
    try:
        with signals.held():  # a Ctrl-C in an at-fork handler (logging's) would be swallowed as "Exception ignored"
            proc = subprocess.Popen(
                [sys.executable, "-m", "wpdump.tracking.keeper", "--pid", str(pid), "--start-ticks",
                 str(start_ticks), "--ready", str(w)],
                pass_fds=(w,), start_new_session=True, stdin=subprocess.DEVNULL, stdout=logfd, stderr=logfd,
            )
    finally:
        os.close(logfd)
    os.close(w)
    try:
        msg = os.read(r, 256)
    finally:
        os.close(r)
    if msg != b"ok":
        proc.wait()
        raise KeeperError(
            f"keeper of pid {pid} did not start: {msg.decode(errors='replace') or 'see ' + log_path}",
            pid=pid, errno=errno.ECHILD,
        )
    k = Keeper.connect(pid)
    if k is None:
        raise KeeperError(f"keeper of pid {pid} did not start: see {log_path}", pid=pid, errno=errno.ECHILD)
    k.checkin(members, iteration, images_dir)
    return k


def _alive_key(name: str) -> bool | None:
    """Whether the process a run-directory name PID-STARTTICKS.* stands for still runs (None: not such a name)."""
    base = name.split(".", 1)[0]
    pid, _, ticks = base.partition("-")
    if not (pid.isdigit() and ticks.isdigit()):
        return None
    try:
        return read_stat(int(pid)).start_ticks == int(ticks)
    except (NoSuchProcess, OSError, ValueError):
        return False


def tracked_pids() -> list[int]:
    """Pids that have a keeper socket in the run directory. Sockets and logs left for processes that are gone
    (a keeper killed with SIGKILL) are removed on the way."""
    d = run_dir()
    out = []
    for name in os.listdir(d):
        alive = _alive_key(name)
        if alive is None:
            continue
        if not alive and (name.endswith(".sock") or name.endswith(".log")):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(d, name))
        elif alive and name.endswith(".sock"):
            out.append(int(name.split("-", 1)[0]))
    return sorted(out)


if __name__ == "__main__":
    sys.exit(keeper_main())
