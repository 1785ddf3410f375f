"""The criu hook's standby: forked by the pre-dump step (before CRIU freezes the tree), with every module imported
and the chains of the tracked tree loaded, it waits for the post-dump step (hook_entry.py) and does the rewrite
then. The post-dump step inside CRIU's frozen window is then a small program asking it over an abstract unix
socket. The standby gives up when CRIU (the pre-dump step's parent) or the tree's root exits (a dump that
failed), or after ``LIFETIME_S``.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import select
import signal
import socket
import struct
import time

from ..errors import WpdumpError
from ..images.chain import load_chain, read_meta, tree_vpids
from ..tracking.session import KeeperSession
from . import criu_hook
from .hook_entry import socket_name

LIFETIME_S = 1800.0


def _chains(root: int) -> dict[tuple[str, int], list]:
    """The chain of every process of the iteration the tree is tracked since (empty if none or broken)."""
    ks = KeeperSession.connect(root)
    if ks is None:
        return {}
    with ks:
        top = ks.status().get("images_dir") or ""
    out: dict[tuple[str, int], list] = {}
    if not top or read_meta(top) is None:
        return out
    for v in tree_vpids(top):
        with contextlib.suppress(WpdumpError, OSError):
            out[(top, v)] = load_chain(top, v)
    return out


def _answer(c: socket.socket, images_dir: str, root: int, chains: dict, after: contextlib.ExitStack) -> bool:
    """Do the post-dump work for a "go" from our own user and report it (what can wait is left to ``after``);
    False when the request was not one."""
    uid = struct.unpack("3i", c.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
    c.settimeout(10)
    try:
        if uid != os.geteuid() or c.recv(16) != b"go\n":
            return False
    except OSError:
        return False
    out = io.StringIO()
    t0 = time.perf_counter()
    criu_hook.post_dump(images_dir, root, out, chains, after)
    print(f"wpdump criu-hook: post-dump done by the standby ready since the pre-dump step, in "
          f"{(time.perf_counter() - t0) * 1e3:.1f} ms", file=out)
    with contextlib.suppress(OSError):
        c.settimeout(None)
        c.sendall((out.getvalue() + "# done\n").encode())
    return True


def _serve(listener: socket.socket, images_dir: str, root: int, pidfds: list[int], chains: dict) -> None:
    deadline = time.monotonic() + LIFETIME_S
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        ready, _, _ = select.select([listener, *pidfds], [], [], left)
        if any(fd in ready for fd in pidfds):
            return  # CRIU or the root exited: the dump failed or is over
        if listener not in ready:
            continue
        c, _ = listener.accept()
        with contextlib.ExitStack() as after, c:  # ``after`` runs once CRIU has its answer: outside the window
            if _answer(c, images_dir, root, chains, after):
                return


def _above_stdio(fd: int) -> int:
    """``fd`` itself, or a close-on-exec copy of it numbered 3 or more (the original closed)."""
    if fd > 2:
        return fd
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return new


def start(images_dir: str, root: int, out) -> None:
    """Fork the standby and wait until it listens; without one the post-dump step does the work itself."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(socket_name(images_dir, root))
        listener.listen(4)
        pidfds = [os.pidfd_open(root), os.pidfd_open(os.getppid())]  # the tree's root, and CRIU
    except OSError as e:
        listener.close()
        print(f"wpdump criu-hook: no standby for post-dump ({e.strerror or e}): it will start afresh", file=out,
              flush=True)
        return
    # CRIU may start its action script with fds 0-2 closed: then these took them, and /dev/null must not replace them
    listener = socket.socket(fileno=_above_stdio(listener.detach()))
    pidfds = [_above_stdio(fd) for fd in pidfds]
    r, w = os.pipe()
    w = _above_stdio(w)
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the standby
        code = 0
        try:
            os.close(r)
            os.setsid()
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            if os.fork() > 0:  # a grandchild: CRIU reaps the action script, not the standby
                os._exit(0)
            chains = _chains(root)  # before the freeze: the pre-dump step waits for "ok"
            os.write(w, b"ok")
            os.close(w)
            _serve(listener, images_dir, root, pidfds, chains)
        except BaseException:  # noqa: BLE001 - the post-dump step then does the work itself
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    listener.close()
    for fd in pidfds:
        os.close(fd)
    try:
        os.waitpid(child, 0)
        os.read(r, 2)
    finally:
        os.close(r)
