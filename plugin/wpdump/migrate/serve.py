"""``wpdump serve``: the destination. Listens where told, takes one migration at a time, writes its iterations
under DIR, runs ``criu restore`` on the final one and answers the restored root pid."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import MigrationError, ProtocolError, WpdumpError
from . import pageserver as ps
from . import protocol as wp
from .receiver import Migration, remove_stale

DEFAULT_MAX_BYTES = 1 << 40
RESTORE_TIMEOUT = 600.0
IDLE_TIMEOUT = 600.0  # seconds without a byte from the source: it is gone


def find_tool(name: str) -> str:
    """``name`` beside this Python (the venv tools/setup made, CRIU 4.x) or on PATH."""
    here = pathlib.Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise MigrationError(f"{name} not found (beside {sys.executable} or on PATH)", errno=errno.ENOENT)
    return found


def last_error(log_path: str) -> str:
    """CRIU's last "Error" line of a log, for a one-line message."""
    try:
        with open(log_path, errors="replace") as f:
            # CRIU cannot raise RLIMIT_NOFILE here and logs it as an error: harmless (docs/kernel.md, CRIU)
            lines = [ln.strip() for ln in f if "Error (" in ln and "RLIMIT_NOFILE" not in ln]
    except OSError:
        return "no log"
    return lines[0][:300] if lines else "no error line in its log"


@dataclass
class Restored:
    pid: int
    images_dir: str
    restore_s: float
    received: int


def restore(criu: str, final: str, extra: list[str]) -> tuple[int, float]:
    """``criu restore -d`` of ``final``; returns the restored root's pid and the seconds it took."""
    pidfile = os.path.join(os.path.dirname(final), "restored.pid")
    t0 = time.perf_counter()
    p = subprocess.run([criu, "restore", "-D", final, "-d", "--pidfile", pidfile, "-o", "restore.log", "-v4", *extra],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                       timeout=RESTORE_TIMEOUT)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        why = last_error(os.path.join(final, "restore.log")) if os.path.exists(os.path.join(final, "restore.log")) \
            else (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise MigrationError(f"criu restore failed (exit {p.returncode}): {why}", errno=errno.EIO)
    try:
        with open(pidfile) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError) as e:
        raise MigrationError(f"criu restore wrote no pid: {e}", errno=errno.EIO) from None
    os.unlink(pidfile)
    return pid, seconds


def serve_one(sk: socket.socket, dest_dir: str, criu: str, restore_args: list[str],
              max_bytes: int = DEFAULT_MAX_BYTES) -> Restored:
    """One migration on an accepted connection. On any error the partial migration is removed, the source is
    told why (best effort), and the error is raised."""
    sk.settimeout(IDLE_TIMEOUT)
    mig = Migration(dest_dir, max_bytes)
    try:
        hello = ps.recv_iov(sk)
        if hello.cmd != wp.WP_HELLO or hello.vaddr != wp.MAGIC:
            raise ProtocolError("not a wpdump migration stream (no HELLO)", errno=errno.EPROTO)
        if hello.nr_pages != wp.VERSION:
            raise ProtocolError(f"migration protocol version {hello.nr_pages}, this side speaks {wp.VERSION}",
                                errno=errno.EPROTO)
        wp.send_reply(sk, 0)
        while True:
            iov = ps.recv_iov(sk)
            if iov.cmd == wp.WP_ITER:
                mig.receive_iteration(sk, iov)
                wp.send_reply(sk, 0, str(mig.received))
            elif iov.cmd == wp.WP_RESTORE and mig.final is not None:
                pid, seconds = restore(criu, mig.final, restore_args)
                name = time.strftime("migration-%Y%m%d-%H%M%S")
                k = 1
                while os.path.lexists(os.path.join(dest_dir, name if k == 1 else f"{name}.{k}")):
                    k += 1
                path = mig.commit(name if k == 1 else f"{name}.{k}")
                wp.send_reply(sk, 0, json.dumps({"pid": pid, "restore_s": seconds, "images_dir": path}))
                return Restored(pid, path, seconds, mig.received)
            else:
                raise ProtocolError(f"unexpected command {iov.cmd:#x} (iterations received: {mig.iterations}, "
                                    f"final: {mig.final is not None})", errno=errno.EPROTO)
    except BaseException as e:
        mig.discard()
        if isinstance(e, (WpdumpError, OSError)):
            _tell(sk, e)
        raise


def _tell(sk: socket.socket, e: BaseException) -> None:
    """Send the error to the source, then read what it still sends until it closes (closing with unread data
    would reset the connection and lose the message)."""
    try:
        wp.send_reply(sk, -(getattr(e, "errno", None) or errno.EPROTO), str(e))
        sk.shutdown(socket.SHUT_WR)
        sk.settimeout(5.0)
        while sk.recv(1 << 16):
            pass
    except OSError:
        pass


def serve(dest_dir: str, address: str, port: int, *, once: bool = False, restore_args: list[str] | None = None,
          max_bytes: int = DEFAULT_MAX_BYTES, out: Callable[[str], None] = print,
          ready: Callable[[int], None] | None = None) -> int:
    """Accept migrations one after another (``once``: just one; returns 0 if it was restored, else 1)."""
    dest_dir = os.path.abspath(dest_dir)
    if not os.path.isdir(dest_dir):
        raise MigrationError(f"{dest_dir} is not a directory", errno=errno.ENOTDIR)
    remove_stale(dest_dir)
    criu = find_tool("criu")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    ls = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            ls.bind((address, port))
        except OSError as e:
            raise MigrationError(f"cannot listen on {address}:{port}: {e.strerror}", errno=e.errno) from None
        ls.listen(1)
        bound = ls.getsockname()[1]
        out(f"wpdump serve: listening on {address}:{bound}, images under {dest_dir}")
        if ready is not None:
            ready(bound)
        while True:
            sk, peer = ls.accept()
            with sk:
                sk.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                try:
                    r = serve_one(sk, dest_dir, criu, restore_args or [], max_bytes)
                except (WpdumpError, OSError) as e:
                    text = str(e) if isinstance(e, WpdumpError) else (e.strerror or str(e))
                    if once:
                        raise MigrationError(f"migration from {peer[0]} failed: {text}", errno=e.errno) from None
                    out(f"wpdump serve: migration from {peer[0]} failed: {text}")
                    continue
                out(f"wpdump serve: restored pid {r.pid} from {r.images_dir} ({r.received / 2**20:.1f} MiB of pages "
                    f"received, restore {r.restore_s * 1e3:.0f} ms)")
                if once:
                    return 0
    finally:
        ls.close()
