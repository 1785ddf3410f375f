"""wpdump's frames around CRIU's page-server commands on a migration connection.

They reuse the 24-byte ``page_server_iov`` header with commands CRIU does not use (0x5701..):
  HELLO   vaddr = MAGIC, nr_pages = VERSION                         -> reply
  ITER    vaddr = iteration n (1, 2, ...), nr_pages = 1 if final, dst_id = parent n (0: none)
          then OPEN2 / ADD_F / CLOSE (CRIU's page-server commands) and FILE frames
  FILE    nr_pages = name length, vaddr = size; then the name, then the bytes
  COMMIT  the iteration is complete                                 -> reply
  RESTORE run criu restore on the final iteration                   -> reply (message: JSON {"pid": ...})
A reply is ``s32 status, u32 length`` + a UTF-8 message; status < 0 is an error. An error reply may also come
where CRIU's protocol expects an answer (OPEN2's byte, CLOSE's status): its first byte is then 0xff.
"""

from __future__ import annotations

import errno
import re
import socket
import struct

from ..errors import ProtocolError
from . import pageserver as ps

MAGIC = 0x57504D49  # "WPMI"
VERSION = 1
WP_HELLO, WP_ITER, WP_FILE, WP_COMMIT, WP_RESTORE = 0x5701, 0x5702, 0x5703, 0x5704, 0x5705
REPLY = struct.Struct("<iI")
MAX_MESSAGE = 4096
MAX_NAME = 128
MAX_FILE = 1 << 30  # one non-memory image (CRIU's tmpfs archives are the biggest)
MAX_FILES = 4096  # per iteration
MAX_ITERATIONS = 1000
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")


def check_name(name: str) -> None:
    """A non-memory image name: one plain path component, no pagemap/pages file (they come as IOVs)."""
    if (not _NAME.fullmatch(name) or ".." in name or len(name) > MAX_NAME or name == "parent"
            or ps.dst_id_of(name) is not None or name.startswith(("pages-", "pagemap-"))):
        raise ProtocolError(f"refusing image file name {name[:MAX_NAME]!r}", errno=errno.EPERM)


def send_reply(sk: socket.socket, status: int, message: str = "") -> None:
    data = message.encode()[:MAX_MESSAGE]
    sk.sendall(REPLY.pack(status, len(data)) + data)


def recv_reply(sk: socket.socket, what: str, first: bytes = b"") -> str:
    """The peer's reply to ``what``; ProtocolError with the peer's message if it reports an error."""
    raw = first + ps.recv_exact(sk, REPLY.size - len(first), f"the answer to {what}")
    status, n = REPLY.unpack(raw)
    if n > MAX_MESSAGE:
        raise ProtocolError(f"the answer to {what} claims a {n}-byte message", errno=errno.EPROTO)
    message = ps.recv_exact(sk, n, f"the answer to {what}").decode(errors="replace")
    if status < 0:
        raise ProtocolError(f"destination: {message or f'error {status}'}", errno=-status)
    return message


def open2(sk: socket.socket, dst_id: int) -> bool:
    """``PS_IOV_OPEN2`` that also understands an error reply in place of CRIU's one-byte answer."""
    ps.send_iov(sk, ps.PS_IOV_OPEN2, dst_id=dst_id)
    b = ps.recv_exact(sk, 1, "the answer to PS_IOV_OPEN2")
    if b == b"\xff":
        recv_reply(sk, "PS_IOV_OPEN2", b)
    return b != b"\0"


def close(sk: socket.socket) -> None:
    """``PS_IOV_CLOSE`` that also understands an error reply in place of CRIU's status."""
    ps.send_iov(sk, ps.PS_IOV_CLOSE)
    raw = ps.recv_exact(sk, ps.STATUS.size, "the answer to PS_IOV_CLOSE")
    (status,) = ps.STATUS.unpack(raw)
    if status < 0:
        recv_reply(sk, "PS_IOV_CLOSE", raw)
    elif status:
        raise ProtocolError(f"the page server answered PS_IOV_CLOSE with status {status}", errno=errno.EPROTO)
