"""The destination's side of one migration stream: every header bounds-checked, each iteration written into a
private staging directory and renamed into place only when complete."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile

import numpy as np

from .. import ranges
from ..errors import ProtocolError
from ..images import format as images
from ..images.chain import read_image_file
from ..ranges import PAGE
from . import pageserver as ps
from . import protocol as wp

BUF = 1 << 20
MAX_PAGEMAPS = 65536  # per iteration: processes and shmem segments of one tree


class _Pagemap:
    """One pagemap being received: entries in a growing numpy array, pages appended to its pages file."""

    def __init__(self, dfd: int, name: str, pages_id: int) -> None:
        self.name, self.pages_id = name, pages_id
        self.fd = os.open(images.pages_file_name(pages_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        self.entries = np.zeros(256, dtype=images.ENTRY_DTYPE)
        self.n = 0
        self.end = 0

    def add(self, iov: ps.Iov) -> None:
        ps.check_add(iov, self.end)
        if self.n == len(self.entries):
            self.entries = np.concatenate((self.entries, np.zeros(len(self.entries), dtype=images.ENTRY_DTYPE)))
        self.entries[self.n] = (iov.vaddr, iov.nr_pages, iov.flags)
        self.n += 1
        self.end = iov.vaddr + iov.nr_pages * PAGE

    def finish(self, dfd: int, parent_dir: str | None) -> None:
        """Write the pagemap; PE_PARENT entries must lie in the parent's pagemap of the same name (CRIU's restore
        spins on one that does not: docs/kernel.md, CRIU and test hosts)."""
        entries = self.entries[: self.n]
        holes = images.ranges_of(entries, images.PE_PARENT)
        if len(holes):
            if parent_dir is None:
                raise ProtocolError(f"{self.name}: PE_PARENT entries in an iteration without a parent",
                                    errno=errno.EPROTO)
            try:
                _, pe = images.decode_pagemap(read_image_file(parent_dir, self.name), self.name)
            except (OSError, images.ImageError, ProtocolError) as e:
                raise ProtocolError(f"{self.name}: PE_PARENT entries but the parent has no such pagemap ({e})",
                                    errno=errno.EPROTO) from None
            missing = ranges.subtract(holes, images.ranges_of(pe))
            if len(missing):
                raise ProtocolError(f"{self.name}: PE_PARENT pages at {int(missing[0][0]):#x} are not in the parent",
                                    errno=errno.EPROTO)
        fd = os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dfd)
        try:
            data = images.encode_pagemap(self.pages_id, entries)
            view = memoryview(data)
            while len(view):
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1

    def abandon(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Migration:
    """The iterations of one migration under ``root`` (a hidden temporary directory until ``commit``)."""

    def __init__(self, dest_dir: str, max_bytes: int) -> None:
        self.dest_dir = dest_dir
        self.root = tempfile.mkdtemp(prefix=f".incoming-{os.getpid()}-", dir=dest_dir)
        self.max_bytes = max_bytes
        self.received = 0
        self.iterations = 0
        self.final: str | None = None
        self.buf = memoryview(bytearray(BUF))

    def path(self, n: int) -> str:
        return os.path.join(self.root, str(n))

    def receive_iteration(self, sk: socket.socket, head: ps.Iov) -> str:
        """Everything from an ITER header to its COMMIT; returns the committed iteration's directory."""
        n, final, parent = head.vaddr, head.nr_pages, head.dst_id
        if self.final is not None:
            raise ProtocolError("an iteration after the final one", errno=errno.EPROTO)
        if n != self.iterations + 1 or n > wp.MAX_ITERATIONS or final not in (0, 1) or parent not in (0, n - 1):
            raise ProtocolError(f"bad iteration header (n={n}, final={final}, parent={parent}) after "
                                f"{self.iterations} iterations", errno=errno.EPROTO)
        staging = tempfile.mkdtemp(prefix=f".{n}.partial-", dir=self.root)
        dfd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        parent_dir = self.path(parent) if parent else None
        if parent_dir:
            os.symlink(f"../{parent}", "parent", dir_fd=dfd)
        pm: _Pagemap | None = None
        names: set[str] = set()
        files = pagemaps = 0
        try:
            while True:
                iov = ps.recv_iov(sk)
                if iov.cmd == ps.PS_IOV_OPEN2:
                    kind, ident = ps.decode_dst_id(iov.dst_id)
                    name = ps.pagemap_name(kind, ident)
                    if name in names:
                        raise ProtocolError(f"{name} sent twice", errno=errno.EPROTO)
                    pagemaps += 1
                    if pagemaps > MAX_PAGEMAPS:
                        raise ProtocolError("too many pagemaps in one iteration", errno=errno.EPROTO)
                    if pm is not None:
                        pm.finish(dfd, parent_dir)
                    names.add(name)
                    pm = _Pagemap(dfd, name, pagemaps)
                    sk.sendall(b"\1" if parent_dir else b"\0")
                elif iov.cmd == ps.PS_IOV_ADD_F:
                    if pm is None or ps.pagemap_name(*ps.decode_dst_id(iov.dst_id)) != pm.name:
                        raise ProtocolError("PS_IOV_ADD_F for a pagemap that is not open", errno=errno.EPROTO)
                    pm.add(iov)
                    if iov.flags & images.PE_PARENT and parent_dir is None:
                        raise ProtocolError(f"{pm.name}: PE_PARENT entries in an iteration without a parent",
                                            errno=errno.EPROTO)
                    if iov.flags & images.PE_PRESENT:
                        n_bytes = iov.nr_pages * PAGE
                        if self.received + n_bytes > self.max_bytes:
                            raise ProtocolError(f"more than {self.max_bytes} bytes of pages", errno=errno.EFBIG)
                        ps.recv_into_fd(sk, pm.fd, n_bytes, self.buf, f"{n_bytes} bytes of pages")
                        self.received += n_bytes
                elif iov.cmd == ps.PS_IOV_CLOSE:
                    if pm is not None:
                        pm.finish(dfd, parent_dir)
                        pm = None
                    sk.sendall(ps.STATUS.pack(0))
                elif iov.cmd == wp.WP_FILE:
                    files += 1
                    if files > wp.MAX_FILES:
                        raise ProtocolError("too many files in one iteration", errno=errno.EPROTO)
                    self._receive_file(sk, dfd, iov, names)
                elif iov.cmd == wp.WP_COMMIT:
                    if pm is not None:
                        raise ProtocolError("COMMIT before PS_IOV_CLOSE", errno=errno.EPROTO)
                    if not pagemaps or "inventory.img" not in names:
                        raise ProtocolError(f"iteration {n} has no pagemap or no inventory.img", errno=errno.EPROTO)
                    break
                else:
                    raise ProtocolError(f"unexpected command {iov.cmd:#x} in iteration {n}", errno=errno.EPROTO)
            os.fsync(dfd)
            os.rename(staging, self.path(n))
        except BaseException:
            if pm is not None:
                pm.abandon()
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            os.close(dfd)
        self.iterations = n
        if final:
            self.final = self.path(n)
        return self.path(n)

    def _receive_file(self, sk: socket.socket, dfd: int, iov: ps.Iov, names: set[str]) -> None:
        if not 0 < iov.nr_pages <= wp.MAX_NAME or iov.vaddr > wp.MAX_FILE or iov.flags or iov.dst_id:
            raise ProtocolError(f"bad file header (name {iov.nr_pages} bytes, size {iov.vaddr})", errno=errno.EPROTO)
        name = ps.recv_exact(sk, iov.nr_pages, "a file name").decode(errors="replace")
        wp.check_name(name)
        if name in names:
            raise ProtocolError(f"{name} sent twice", errno=errno.EPROTO)
        if self.received + iov.vaddr > self.max_bytes:
            raise ProtocolError(f"more than {self.max_bytes} bytes", errno=errno.EFBIG)
        names.add(name)
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            ps.recv_into_fd(sk, fd, iov.vaddr, self.buf, name)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.received += iov.vaddr

    def commit(self, name: str) -> str:
        """Rename the migration to ``dest_dir/name`` (after the restore): it is then a complete CRIU chain."""
        dest = os.path.join(self.dest_dir, name)
        os.rename(self.root, dest)
        self.root = dest
        return dest

    def discard(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def remove_stale(dest_dir: str) -> None:
    """Remove ``.incoming-PID-*`` directories of receivers that were killed (their pid is gone)."""
    from ..target.process import exists

    for name in os.listdir(dest_dir):
        if name.startswith(".incoming-"):
            pid = name.split("-")[1]
            if pid.isdigit() and not exists(int(pid)):
                shutil.rmtree(os.path.join(dest_dir, name), ignore_errors=True)
