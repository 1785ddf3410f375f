"""The criu hook's standby: forked by the pre-dump step (before CRIU freezes the tree), with every module imported,
the tree's trackers checked out, the chains loaded, a sample of them read and the copy buffers faulted in
(criu_hook.get_ready), it waits for the post-dump step (the wpdump-criu-hook program, native/hook_client.c, or
hook_entry.py) and does the rewrite then. The post-dump step inside CRIU's frozen window is then a small program
asking it over an abstract unix socket. The standby gives up when CRIU (the pre-dump step's parent) or the tree's
root exits (a dump that failed: the checkout is given back, tracking goes on), or after ``LIFETIME_S``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import select
import signal
import socket
import struct
import time

from ..errors import WpdumpError
from ..tracking.session import KeeperSession
from . import criu_hook
from .hook_entry import request, socket_name

LIFETIME_S = 1800.0


def _get_ready(root: int) -> criu_hook.Ready | criu_hook.HookSkipped:
    """criu_hook.get_ready's work before the freeze, or why the tree will be left as CRIU dumps it."""
    ks = KeeperSession.connect(root)
    if ks is None:
        return criu_hook.HookSkipped(f"pid {root} is not tracked by wpdump (no keeper)", pid=root, errno=errno.ENOENT)
    try:
        return criu_hook.get_ready(root, ks, bufs=criu_hook.copy_buffers())
    except (WpdumpError, OSError) as e:
        ks.close()  # a checkout not given back ends tracking: only get_ready's last step checks out
        return e if isinstance(e, criu_hook.HookSkipped) else criu_hook.HookSkipped(str(e), pid=root, errno=e.errno)


def _read_exactly(c: socket.socket, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        b = c.recv(n - got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def _answer(c: socket.socket, images_dir: str, root: int, ready, after: contextlib.ExitStack) -> bool:
    """Do the post-dump work for a request from our own user for this images directory and report it (what can
    wait is left to ``after``); False when the request was not one."""
    uid = struct.unpack("3i", c.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
    want = request(images_dir)
    c.settimeout(10)
    try:
        if uid != os.geteuid() or _read_exactly(c, len(want)) != want:
            return False
    except OSError:
        return False
    out = io.StringIO()
    t0 = time.perf_counter()
    criu_hook.post_dump(images_dir, root, out, ready, after)
    print(f"wpdump criu-hook: post-dump done by the standby ready since the pre-dump step, in "
          f"{(time.perf_counter() - t0) * 1e3:.1f} ms", file=out)
    with contextlib.suppress(OSError):
        c.settimeout(None)
        c.sendall((out.getvalue() + "# done\n").encode())
    return True


def _serve(listener: socket.socket, images_dir: str, root: int, pidfds: list[int], ready) -> None:
    deadline = time.monotonic() + LIFETIME_S
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready_fds, _, _ = select.select([listener, *pidfds], [], [], left)
            if any(fd in ready_fds for fd in pidfds):
                break  # CRIU or the root exited: the dump failed or is over
            if listener not in ready_fds:
                continue
            c, _ = listener.accept()
            with contextlib.ExitStack() as after, c:  # ``after`` runs once CRIU has its answer: outside the window
                if _answer(c, images_dir, root, ready, after):
                    return
    finally:
        listener.close()
    if isinstance(ready, criu_hook.Ready):  # never asked: nothing harvested, tracking goes on as before
        with contextlib.suppress(WpdumpError, OSError), ready.ks:
            ready.ks.giveback()


def _above_stdio(fd: int) -> int:
    """``fd`` itself, or a close-on-exec copy of it numbered 3 or more (the original closed)."""
    if fd > 2:
        return fd
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return new


def start(images_dir: str, root: int, out) -> None:
    """Fork the standby and wait until it is ready; without one the post-dump step does the work itself."""
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
            ready = _get_ready(root)  # before the freeze: the pre-dump step waits for "ok"
            os.write(w, b"ok")
            os.close(w)
            _serve(listener, images_dir, root, pidfds, ready)
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
