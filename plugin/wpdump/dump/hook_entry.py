"""``wpdump-criu-hook``, the program CRIU execs as its action script: the post-dump step asks the standby that
the pre-dump step left (hook_standby.py) and prints its report, so that no interpreter start-up or import runs
inside CRIU's frozen window (docs/kernel.md, costs: importing the hook took 110-165 ms there). Standard library
only; everything else (and every fallback) is criu_hook.py.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import sys

REPLY_LIMIT = 1 << 20
WAIT_S = 600.0  # the rewrite of a big tree may take a while; CRIU waits for its action script anyway


def socket_name(images_dir: str, root: int) -> bytes:
    """The standby's abstract unix socket for one ``criu dump`` (no file anywhere)."""
    digest = hashlib.sha256(f"{os.geteuid()}:{root}:{images_dir}".encode()).hexdigest()[:32]
    return b"\0wpdump-criu-hook-" + digest.encode()


def ask_standby(images_dir: str, root: int) -> str | None:
    """The standby's report of the post-dump work it did, or None when there is no standby (of ours) to ask."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(socket_name(images_dir, root))
        uid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid != os.geteuid():  # someone else holds the name: not ours to trust
            return None
        s.settimeout(WAIT_S)
        s.sendall(b"go\n")
        parts, n = [], 0
        while n < REPLY_LIMIT:
            b = s.recv(65536)
            if not b:
                break
            parts.append(b)
            n += len(b)
    except OSError:
        return None
    finally:
        s.close()
    text = b"".join(parts).decode(errors="replace")
    return text if text.endswith("\n# done\n") else None  # a standby that died half-way: do it here


def main() -> int:
    env = os.environ
    if env.get("CRTOOLS_SCRIPT_ACTION") == "post-dump":
        try:
            images_dir, root = os.path.realpath(env["CRTOOLS_IMAGE_DIR"]), int(env["CRTOOLS_INIT_PID"])
        except (KeyError, ValueError):
            images_dir, root = "", 0
        report = ask_standby(images_dir, root) if root else None
        if report is not None:
            sys.stderr.write(report.removesuffix("# done\n"))
            return 0
    from .criu_hook import run_hook

    return run_hook(standby=True)
