"""``wpdump-criu-hook-py``: the criu hook in Python, which the ``wpdump-criu-hook`` program (native/hook_client.c,
what CRIU execs as its action script) runs for the pre-dump step and whenever it finds no standby to ask. At
post-dump it too asks the standby the pre-dump step left (hook_standby.py) first; everything else (and every
fallback) is criu_hook.py. Standard library only until then; the socket's name and the request are built here
and in hook_client.c alike.
"""

from __future__ import annotations

import os
import socket
import struct
import sys

REPLY_LIMIT = 1 << 20
WAIT_S = 600.0  # the rewrite of a big tree may take a while; CRIU waits for its action script anyway
DONE = b"\n# done\n"  # the report's last line: the standby finished


def _fnv1a(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def socket_name(images_dir: str, root: int) -> bytes:
    """The standby's abstract unix socket for one ``criu dump`` (no file anywhere): the user, the tree's root and
    a hash of the images directory (FNV-1a, as hook_client.c computes it)."""
    return f"\0wpdump-criu-hook-{os.geteuid()}-{root}-{_fnv1a(os.fsencode(images_dir)):016x}".encode()


def request(images_dir: str) -> bytes:
    """What the post-dump step sends the standby: the images directory in full (the name only hashes it)."""
    return b"go " + os.fsencode(images_dir) + b"\n"


def ask_standby(images_dir: str, root: int) -> str | None:
    """The standby's report of the post-dump work it did, or None when there is no standby (of ours) to ask."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(socket_name(images_dir, root))
        uid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid != os.geteuid():  # someone else holds the name: not ours to trust
            return None
        s.settimeout(WAIT_S)
        s.sendall(request(images_dir))
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
    data = b"".join(parts)
    if not data.endswith(DONE):
        return None  # a standby that died half-way: do it here
    return data[: -len(DONE) + 1].decode(errors="replace")


def main() -> int:
    env = os.environ
    if env.get("CRTOOLS_SCRIPT_ACTION") == "post-dump":
        try:
            images_dir, root = os.path.realpath(env["CRTOOLS_IMAGE_DIR"]), int(env["CRTOOLS_INIT_PID"])
        except (KeyError, ValueError):
            images_dir, root = "", 0
        report = ask_standby(images_dir, root) if root else None
        if report is not None:
            sys.stderr.write(report)
            return 0
    from .criu_hook import run_hook

    return run_hook(standby=True)
