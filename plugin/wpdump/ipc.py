"""Messages over a unix stream socket between wpdump's processes (the command, its ptrace agent, the keepers):
a JSON header and a payload, file descriptors attached to the first bytes (SCM_RIGHTS)."""

from __future__ import annotations

import json
import os
import socket
import struct

_PREFIX = struct.Struct("<II")  # header length, payload length
_MAX_HEADER = 1 << 16


def send_msg(sock: socket.socket, header: dict, payload: bytes = b"", fds: tuple[int, ...] = ()) -> None:
    head = json.dumps(header).encode()
    first = _PREFIX.pack(len(head), len(payload)) + head
    if fds:
        socket.send_fds(sock, [first], list(fds))
    else:
        sock.sendall(first)
    if payload:
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        b = sock.recv(min(n - got, 1 << 20))
        if not b:
            raise EOFError
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def recv_msg(sock: socket.socket) -> tuple[dict, bytes, list[int]]:
    """One message: (header, payload, received fds). EOFError when the peer closed the connection."""
    data, fds, _, _ = socket.recv_fds(sock, _PREFIX.size, 4)
    if not data:
        raise EOFError
    if len(data) < _PREFIX.size:
        data += _recv_exact(sock, _PREFIX.size - len(data))
    hlen, plen = _PREFIX.unpack(data)
    if hlen > _MAX_HEADER:
        for fd in fds:
            os.close(fd)
        raise EOFError
    header = json.loads(_recv_exact(sock, hlen))
    payload = _recv_exact(sock, plen) if plen else b""
    return header, payload, fds
