"""CRIU's page-server protocol (criu/page-xfer.c): the ``page_server_iov`` header, its commands, and the
checks every header from an untrusted peer must pass.

The header is ``struct page_server_iov {u32 cmd; u32 nr_pages; u64 vaddr; u64 dst_id}`` (24 bytes, little
endian here); ``cmd`` carries the pagemap flags in its high 16 bits (``PS_IOV_ADD_F``); ``dst_id`` names the
pagemap: ``id << 8 | type`` with type 1 = a task's ``pagemap-ID.img``, 2 = ``pagemap-shmem-ID.img``.
``PS_IOV_OPEN2`` is answered with one byte (1 when the receiver has a parent iteration), ``PS_IOV_ADD_F`` with
``PE_PRESENT`` is followed by ``nr_pages`` pages of data, ``PS_IOV_CLOSE`` is answered with an s32 status (0).
``PS_IOV_GET`` (lazy pages; its dst_id is the bare pid) asks a dumping CRIU for pages; CRIU 4.1.1 fails it on
this kernel (see lazy.py).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass

import numpy as np

from ..errors import ProtocolError
from ..images import format as images
from ..ranges import PAGE

IOV = struct.Struct("<IIQQ")
PS_IOV_ADD, PS_IOV_HOLE, PS_IOV_OPEN, PS_IOV_OPEN2, PS_IOV_PARENT, PS_IOV_ADD_F, PS_IOV_GET = 1, 2, 3, 4, 5, 6, 7
PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE = 0x1023, 0x1024
PS_CMD_BITS, PS_TYPE_BITS = 16, 8
PS_TYPE_PID, PS_TYPE_SHMEM = 1, 2
STATUS = struct.Struct("<i")

MAX_ID = (1 << 31) - 1  # pids
MAX_SHMID = (1 << 56) - 1  # shmem ids are inode numbers (wpdump makes them unique with + k << 40); id << 8 fits u64
TASK_END = 1 << 57  # no user address reaches this (5-level paging)
MAX_IOV_PAGES = 1 << 18  # 1 GiB in one header (CRIU sends at most a page pipe's worth; the sender splits)


def ps_cmd(cmd: int, flags: int = 0) -> int:
    return (flags << PS_CMD_BITS) | cmd


def encode_dst_id(kind: int, ident: int) -> int:
    return (ident << PS_TYPE_BITS) | kind


def decode_dst_id(dst_id: int) -> tuple[int, int]:
    """(type, id) of a ``dst_id``; ProtocolError unless it names a task or shmem pagemap with a sane id."""
    kind, ident = dst_id & ((1 << PS_TYPE_BITS) - 1), dst_id >> PS_TYPE_BITS
    if kind not in (PS_TYPE_PID, PS_TYPE_SHMEM) or not 0 < ident <= (MAX_ID if kind == PS_TYPE_PID else MAX_SHMID):
        raise ProtocolError(f"bad page-server dst_id {dst_id:#x}", errno=errno.EPROTO)
    return kind, ident


def pagemap_name(kind: int, ident: int) -> str:
    return images.pagemap_file_name(ident) if kind == PS_TYPE_PID else f"pagemap-shmem-{ident}.img"


def dst_id_of(name: str) -> int | None:
    """The ``dst_id`` of a pagemap file name, None if ``name`` is no pagemap."""
    for prefix, kind in (("pagemap-shmem-", PS_TYPE_SHMEM), ("pagemap-", PS_TYPE_PID)):
        if name.startswith(prefix) and name.endswith(".img"):
            mid = name[len(prefix):-4]
            if mid.isdigit() and 0 < int(mid) <= (MAX_SHMID if kind == PS_TYPE_SHMEM else MAX_ID):
                return encode_dst_id(kind, int(mid))
            return None
    return None


@dataclass(frozen=True)
class Iov:
    cmd: int
    flags: int
    nr_pages: int
    vaddr: int
    dst_id: int


def unpack(raw: bytes) -> Iov:
    cmd, nr, vaddr, dst = IOV.unpack(raw)
    return Iov(cmd & ((1 << PS_CMD_BITS) - 1), cmd >> PS_CMD_BITS, nr, vaddr, dst)


def check_add(iov: Iov, prev_end: int) -> None:
    """Bounds of a ``PS_IOV_ADD_F`` header: known flags (present or parent, not both, not lazy), 1..MAX pages,
    page-aligned, inside user space, after the previous entry of the same pagemap."""
    if iov.flags not in (images.PE_PRESENT, images.PE_PARENT):
        raise ProtocolError(f"PS_IOV_ADD_F with pagemap flags {iov.flags:#x}", errno=errno.EPROTO)
    if not 0 < iov.nr_pages <= MAX_IOV_PAGES:
        raise ProtocolError(f"PS_IOV_ADD_F of {iov.nr_pages} pages", errno=errno.EPROTO)
    end = iov.vaddr + iov.nr_pages * PAGE
    if iov.vaddr % PAGE or end > TASK_END:
        raise ProtocolError(f"PS_IOV_ADD_F at {iov.vaddr:#x} (+{iov.nr_pages} pages) is no user range",
                            errno=errno.EPROTO)
    if iov.vaddr < prev_end:
        raise ProtocolError(f"PS_IOV_ADD_F at {iov.vaddr:#x} overlaps or precedes the previous entry",
                            errno=errno.EPROTO)


# ---- I/O on a blocking socket ----


def recv_exact(sk: socket.socket, n: int, what: str) -> bytes:
    """Exactly ``n`` bytes; ProtocolError naming ``what`` when the peer closes first."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sk.recv_into(view[got:])
        if k == 0:
            raise ProtocolError(f"the connection ended in the middle of {what} ({got} of {n} bytes)",
                                errno=errno.ECONNRESET)
        got += k
    return bytes(buf)


def recv_iov(sk: socket.socket, allow_eof: bool = False) -> Iov | None:
    """One header; None at a clean end of stream when ``allow_eof``."""
    first = sk.recv(IOV.size)
    if not first:
        if allow_eof:
            return None
        raise ProtocolError("the connection ended before a page-server header", errno=errno.ECONNRESET)
    if len(first) < IOV.size:
        first += recv_exact(sk, IOV.size - len(first), "a page-server header")
    return unpack(first)


def send_iov(sk: socket.socket, cmd: int, nr_pages: int = 0, vaddr: int = 0, dst_id: int = 0, flags: int = 0) -> None:
    sk.sendall(IOV.pack(ps_cmd(cmd, flags), nr_pages, vaddr, dst_id))


def recv_into_fd(sk: socket.socket, fd: int, n: int, buf: memoryview, what: str) -> None:
    """Copy exactly ``n`` bytes from the socket to ``fd`` through ``buf``."""
    while n:
        k = sk.recv_into(buf[: min(n, len(buf))])
        if k == 0:
            raise ProtocolError(f"the connection ended in the middle of {what}", errno=errno.ECONNRESET)
        view = buf[:k]
        while len(view):
            view = view[os.write(fd, view):]
        n -= k


def send_from_fd(sk: socket.socket, fd: int, offset: int, n: int, what: str) -> None:
    """``n`` bytes of ``fd`` from ``offset`` into the socket (sendfile: no copy through Python; socket.sendfile
    waits for a socket with a timeout, which is non-blocking underneath)."""
    with open(fd, "rb", buffering=0, closefd=False) as f:
        if sk.sendfile(f, offset, n) != n:
            raise ProtocolError(f"{what} is shorter than its pagemap says", errno=errno.EIO)


# ---- the sending side ----


def open2(sk: socket.socket, dst_id: int) -> bool:
    """``PS_IOV_OPEN2``; returns whether the receiver has a parent iteration."""
    send_iov(sk, PS_IOV_OPEN2, dst_id=dst_id)
    return recv_exact(sk, 1, "the answer to PS_IOV_OPEN2") != b"\0"


def send_pagemap(sk: socket.socket, dst_id: int, entries: np.ndarray, pages_fd: int, pages_path: str) -> int:
    """Send one pagemap (opened with ``open2``): one ``PS_IOV_ADD_F`` per entry, PE_PRESENT followed by its
    pages read from ``pages_fd`` (the pages file, in entry order). Returns the page bytes sent."""
    off = 0
    for vaddr, nr, flags in zip(entries["vaddr"].tolist(), entries["nr_pages"].tolist(), entries["flags"].tolist(),
                                strict=True):
        present = bool(flags & images.PE_PRESENT)
        while nr:  # an entry longer than a header may say (wpdump merges whole VMAs) goes as several
            k = min(nr, MAX_IOV_PAGES)
            send_iov(sk, PS_IOV_ADD_F, k, vaddr, dst_id, images.PE_PRESENT if present else images.PE_PARENT)
            if present:
                send_from_fd(sk, pages_fd, off, k * PAGE, pages_path)
                off += k * PAGE
            nr, vaddr = nr - k, vaddr + k * PAGE
    return off


def close(sk: socket.socket) -> None:
    """``PS_IOV_CLOSE`` and its status: the receiver has everything."""
    send_iov(sk, PS_IOV_CLOSE)
    (status,) = STATUS.unpack(recv_exact(sk, STATUS.size, "the answer to PS_IOV_CLOSE"))
    if status:
        raise ProtocolError(f"the page server answered PS_IOV_CLOSE with status {status}", errno=errno.EPROTO)
