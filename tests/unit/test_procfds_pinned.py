"""procfds, iouring and pinned on this process's own fds and threads (no other process, no privilege): a real
io_uring with registered buffers, threads blocked in read/readv/io_uring_enter, and fdinfo texts of kernels that
do not list the buffers."""

from __future__ import annotations

import ctypes
import mmap
import os
import pathlib
import signal
import threading
import time

import numpy as np
import pytest
from conftest import unavailable
from wpdump.ranges import PAGE as PAGE_SIZE
from wpdump.target import iouring, procfds
from wpdump.tracking import pinned

PAGE = PAGE_SIZE
libc = ctypes.CDLL(None, use_errno=True)
# io_uring syscall numbers are the same on every architecture (asm-generic/unistd.h)
SYS_IO_URING_SETUP, SYS_IO_URING_ENTER, SYS_IO_URING_REGISTER = 425, 426, 427
IORING_REGISTER_BUFFERS, IORING_UNREGISTER_BUFFERS = 0, 1
IORING_ENTER_GETEVENTS = 1
ME = os.getpid()


def addr_of(m: mmap.mmap) -> int:
    buf = (ctypes.c_char * 1).from_buffer(m)
    try:
        return ctypes.addressof(buf)
    finally:
        del buf


def io_uring() -> int:
    params = ctypes.create_string_buffer(120)  # struct io_uring_params
    fd = libc.syscall(SYS_IO_URING_SETUP, 4, params)
    if fd < 0:
        unavailable(f"kernel lacks io_uring (io_uring_setup: {os.strerror(ctypes.get_errno())})")
    return fd


def register(fd: int, bufs: list[tuple[int, int]]) -> None:
    iov = (ctypes.c_uint64 * (2 * len(bufs)))(*[x for b in bufs for x in b])
    assert libc.syscall(SYS_IO_URING_REGISTER, fd, IORING_REGISTER_BUFFERS, iov, len(bufs)) == 0, \
        os.strerror(ctypes.get_errno())


# ------------------------------------------------------------------------------------------------ procfds

def test_fd_targets_flags_and_fdinfo_of_own_fds(tmp_path: pathlib.Path) -> None:
    r, w = os.pipe()
    path = tmp_path / "a file with spaces"
    f = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
    try:
        fds = procfds.fd_targets(ME)
        assert fds[f] == str(path)
        assert fds[r].startswith("pipe:[") and fds[r] == fds[w]
        assert set(fds) >= {0, 1, 2, r, w, f}
        acc = os.O_ACCMODE | os.O_APPEND
        assert procfds.fd_flags(ME, f) & acc == os.O_RDWR | os.O_APPEND
        assert procfds.fd_flags(ME, w) & os.O_ACCMODE == os.O_WRONLY
        assert "flags:" in procfds.fdinfo(ME, f) and "mnt_id:" in procfds.fdinfo(ME, f)
        assert procfds.userfaultfds(ME) == []
        assert procfds.userfaultfds(ME, {7: procfds.USERFAULTFD, 3: "pipe:[1]", 5: procfds.USERFAULTFD}) == [5, 7]
    finally:
        for fd in (r, w, f):
            os.close(fd)
    assert procfds.fdinfo(ME, f) == "" or f in procfds.fd_targets(ME)  # closed: gone (unless reused)
    assert procfds.fd_flags(ME, 1 << 20) == 0 and procfds.fdinfo(ME, 1 << 20) == ""


# ------------------------------------------------------------------------------------------------ io_uring

def test_registered_buffers_of_a_real_io_uring() -> None:
    """Buffers registered with IORING_REGISTER_BUFFERS, one a sparse (empty) slot, as fdinfo lists them."""
    a, b = mmap.mmap(-1, 3 * PAGE), mmap.mmap(-1, PAGE)
    ring = io_uring()
    try:
        assert procfds.fd_targets(ME)[ring] == procfds.IO_URING
        assert iouring.registered_buffers(ME) == []
        pa, pb = addr_of(a), addr_of(b)
        register(ring, [(pa, 3 * PAGE), (0, 0), (pb + 100, 50)])
        want = [(pa, pa + 3 * PAGE), (pb + 100, pb + 150)]
        assert iouring.registered_buffers(ME) == want
        fds = procfds.fd_targets(ME)
        assert iouring.registered_buffers(ME, fds) == want
        assert iouring.registered_buffers(ME, {k: v for k, v in fds.items() if k != ring}) == []
        assert libc.syscall(SYS_IO_URING_REGISTER, ring, IORING_UNREGISTER_BUFFERS, None, 0) == 0
        assert iouring.registered_buffers(ME) == []
    finally:
        os.close(ring)
        a.close()
        b.close()


FDINFO_618 = """pos:\t0
flags:\t02000002
mnt_id:\t17
ino:\t529413
SqMask:\t0x3
UserFiles:\t1
    0: ring.sock
UserBufs:\t3
    0: 0x7f5a8443c000/12288
    1: <none>
    2: 0x7f5a843bd064/50
PollList:
CqOverflowList:
NAPI:\tdisabled
"""


@pytest.mark.parametrize(("text", "want"), [
    (FDINFO_618, [(0x7F5A8443C000, 0x7F5A8443C000 + 12288), (0x7F5A843BD064, 0x7F5A843BD064 + 50)]),
    # the ring's lock was busy: the kernel prints the count but not the buffers
    ("UserFiles:\t0\nUserBufs:\t2\nPollList:\n", []),
    # a kernel without the section, and an fd gone meanwhile
    ("pos:\t0\nflags:\t02\nSqMask:\t0x3\n", []),
    ("", []),
    # a zero-length buffer is no buffer; the section ends at the next unindented line
    ("UserBufs:\t2\n    0: 0x1000/0\n    1: 0x5000/8192\nPollList:\n    0: 0x9000/4096\n", [(0x5000, 0x7000)]),
])
def test_registered_buffers_parses_fdinfo(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path,
                                          text: str, want: list) -> None:
    """fdinfo texts the running kernel does not produce, read from a file in place of /proc/PID/fdinfo/FD."""
    f = tmp_path / "fdinfo"
    f.write_text(text)
    monkeypatch.setattr(iouring, "fdinfo", lambda pid, fd: f.read_text())
    assert iouring.registered_buffers(ME, {9: procfds.IO_URING, 4: "pipe:[3]"}) == want


# ------------------------------------------------------------------------------------------------ pinned

def test_page_span_against_arithmetic() -> None:
    rng = np.random.default_rng(51)
    cases = [(0, 0), (PAGE, 0), (PAGE + 1, 0), (0, 1), (PAGE - 1, 2), (PAGE, PAGE), (5, 3 * PAGE)]
    cases += [(int(b), int(n)) for b, n in zip(rng.integers(0, 1 << 47, 300), rng.integers(0, 1 << 20, 300),
                                               strict=True)]
    for base, length in cases:
        lo, hi = pinned._page_span(base, length)
        assert lo == base // PAGE * PAGE and hi == -(-(base + length) // PAGE) * PAGE, (base, length)
        if length:  # exactly the pages holding a byte of the buffer
            assert (hi - lo) // PAGE == (base + length - 1) // PAGE - base // PAGE + 1


class Blocked:
    """A thread of this process blocked in a syscall (``fn``) until ``release`` runs."""

    def __init__(self, fn, nr: int) -> None:
        self.tid = 0
        self.result = None
        ready = threading.Event()

        def run() -> None:
            self.tid = threading.get_native_id()
            ready.set()
            self.result = fn()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(30)
        deadline = time.monotonic() + 30  # the kernel's own word that it blocks there: no sleep
        while (sc := pinned._thread_syscall(ME, self.tid)) is None or sc[0] != nr:
            assert time.monotonic() < deadline, f"thread {self.tid} never blocked in syscall {nr}"
        self.syscall = sc

    def join(self) -> None:
        self.thread.join(30)
        assert not self.thread.is_alive()


def _dev_is_uncached(path: str) -> bool:
    """Is ``path`` on devtmpfs (where pinned counts any device as possibly pinning)? From mountinfo."""
    best, fs = "", ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            mnt = parts[4]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, fs = mnt, parts[parts.index("-") + 1]
    return fs == "devtmpfs"


def test_in_flight_read_and_readv_on_a_pty() -> None:
    """Threads blocked in read() and readv() on a pty master: the syscall words, the iovec array read from this
    process's memory, and their buffers' pages when the fd is one a read may pin (a device on devtmpfs)."""
    master, slave = os.openpty()
    buf = mmap.mmap(-1, 4 * PAGE)
    base = addr_of(buf)
    try:
        fds = procfds.fd_targets(ME)
        pins = fds[master] == "/dev/ptmx" and _dev_is_uncached("/dev/ptmx")
        assert pinned._FdKinds(ME, fds).may_pin(master) == pins
        t = Blocked(lambda: libc.read(master, ctypes.c_void_p(base + 100), 2 * PAGE), pinned._NR["read"])
        assert t.syscall[:4] == [pinned._NR["read"], master, base + 100, 2 * PAGE]
        res = pinned.in_flight(ME, [t.tid], fds)
        assert res.warnings == []
        assert res.ranges.tolist() == ([[base, base + 3 * PAGE]] if pins else [])
        os.write(slave, b"xy")
        t.join()
        assert t.result == 2
        parts = [memoryview(buf)[PAGE + 8 : PAGE + 16], memoryview(buf)[3 * PAGE : 4 * PAGE]]
        t = Blocked(lambda: os.readv(master, parts), pinned._NR["readv"])
        assert t.syscall[:2] == [pinned._NR["readv"], master] and t.syscall[3] == 2
        assert pinned._iovecs(ME, t.syscall[2], t.syscall[3]) == [(base + PAGE + 8, 8), (base + 3 * PAGE, PAGE)]
        res = pinned.in_flight(ME, [t.tid], fds)
        assert res.ranges.tolist() == ([[base + PAGE, base + 2 * PAGE], [base + 3 * PAGE, base + 4 * PAGE]]
                                       if pins else [])
        os.write(slave, b"yz")
        t.join()
        assert t.result == 2 and buf[PAGE + 8 : PAGE + 10] == b"yz"
        for p in parts:
            p.release()
    finally:
        os.close(master)
        os.close(slave)
        buf.close()


def test_in_flight_ignores_pipes_and_names_io_uring_waits() -> None:
    r, w = os.pipe()
    ring = io_uring()
    buf = ctypes.create_string_buffer(64)
    old = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        fds = procfds.fd_targets(ME)
        assert not pinned._FdKinds(ME, fds).may_pin(r)
        t = Blocked(lambda: libc.read(r, buf, 64), pinned._NR["read"])
        u = Blocked(lambda: libc.syscall(SYS_IO_URING_ENTER, ring, 0, 1, IORING_ENTER_GETEVENTS, None, 0),
                    pinned._NR["io_uring_enter"])
        res = pinned.in_flight(ME, [t.tid, u.tid, threading.get_native_id()], fds)
        assert len(res.ranges) == 0
        assert len(res.warnings) == 1 and f"thread {u.tid} waits in io_uring_enter" in res.warnings[0]
        os.write(w, b"z")
        t.join()
        signal.pthread_kill(u.thread.ident, signal.SIGUSR1)  # ends its wait with EINTR
        u.join()
        assert u.result == -1
    finally:
        signal.signal(signal.SIGUSR1, old)
        for fd in (r, w, ring):
            os.close(fd)


def test_may_pin_o_direct_files(tmp_path: pathlib.Path) -> None:
    """A file opened O_DIRECT may be read into pinned pages; the same file through the page cache may not
    (unless its filesystem serves reads without the page cache); sockets and pipes never."""
    path = tmp_path / "f"
    path.write_bytes(bytes(PAGE))
    plain = os.open(path, os.O_RDONLY)
    try:
        direct = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        os.close(plain)
        unavailable(f"the filesystem of {tmp_path} lacks O_DIRECT: {e.strerror}")
    r, w = os.pipe()
    try:
        fds = procfds.fd_targets(ME)
        kinds = pinned._FdKinds(ME, fds)
        st = os.stat(path)
        with open("/proc/self/mountinfo") as f:
            fs = next(line.split(" - ")[1].split()[0] for line in f
                      if line.split()[2] == f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
        assert kinds.may_pin(direct)
        assert kinds.may_pin(plain) == (fs.split(".")[0] in pinned._UNCACHED_FS or fs == "devtmpfs")
        assert not kinds.may_pin(r) and not kinds.may_pin(w) and not kinds.may_pin(1 << 20)
    finally:
        for fd in (plain, direct, r, w):
            os.close(fd)
