"""Messages over a unix stream socket between wpdump's processes (the command, its ptrace agent, the keepers):
a JSON header and a payload, file descriptors attached to the first bytes (SCM_RIGHTS)."""

from __future__ import annotations

import json
import os
import socket
import struct

_PREFIX = struct.Struct("<II")  # header length, payload length
_MAX_HEADER = 1 << 24  # a tree of thousands of processes lists them all
_FDS_PER_MSG = 250  # SCM_MAX_FD is 253: more travel in follow-up chunks of one byte each


def send_msg(sock: socket.socket, header: dict, payload: bytes = b"", fds: tuple[int, ...] = ()) -> None:
    if len(fds) > _FDS_PER_MSG:
        header = {**header, "_nfds": len(fds)}
    head = json.dumps(header).encode()
    first = _PREFIX.pack(len(head), len(payload)) + head
    if fds:
        sent = socket.send_fds(sock, [first], list(fds[:_FDS_PER_MSG]))
        if sent < len(first):
            sock.sendall(first[sent:])
    else:
        sock.sendall(first)
    if payload:
        sock.sendall(payload)
    for i in range(_FDS_PER_MSG, len(fds), _FDS_PER_MSG):
        socket.send_fds(sock, [b"F"], list(fds[i : i + _FDS_PER_MSG]))


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
    data, fds, _, _ = socket.recv_fds(sock, _PREFIX.size, _FDS_PER_MSG)
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
    want = header.pop("_nfds", len(fds)) if isinstance(header, dict) else len(fds)
    while len(fds) < want:
        b, more, _, _ = socket.recv_fds(sock, 1, _FDS_PER_MSG)
        if b != b"F" or not more:
            for fd in fds + more:
                os.close(fd)
            raise EOFError
        fds.extend(more)
    return header, payload, fds
