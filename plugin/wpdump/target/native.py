"""The one way into native code: the cffi module ``wpdump._native`` (native/*.c, one function per kernel
operation returning -errno) and the check that turns a -errno into a typed error, so none reaches callers."""

from __future__ import annotations

import struct

from .. import _native
from ..errors import from_errno

ffi, lib = _native.ffi, _native.lib

_RSEQ_CONF = struct.Struct("<QIIII")  # struct ptrace_rseq_configuration


def check(r: int, pid: int | None, what: str) -> int:
    """``r`` when it is no -errno, else the typed error for it (errno and pid carried)."""
    if r < 0:
        raise from_errno(r, pid, what)
    return r


def rseq_area(tid: int) -> tuple[int, int] | None:
    """(address, size) of the rseq area of a ptrace-stopped thread, None when it registered none."""
    buf = ffi.new("char[]", _RSEQ_CONF.size)
    n = check(lib.wpd_ptrace_rseq_configuration(tid, buf, _RSEQ_CONF.size), tid, "PTRACE_GET_RSEQ_CONFIGURATION")
    if n < _RSEQ_CONF.size:
        return None
    ptr, size, _sig, _flags, _pad = _RSEQ_CONF.unpack(bytes(ffi.buffer(buf, _RSEQ_CONF.size)))
    return (ptr, size) if ptr else None


def punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(PUNCH_HOLE | KEEP_SIZE) of [offset, offset + length) of ``fd``."""
    check(lib.wpd_punch_hole(fd, offset, length), None, "fallocate(PUNCH_HOLE)")


KCMP_VM = 1


def same_mm(pid1: int, pid2: int) -> bool:
    """Whether two processes share one address space (a vfork or CLONE_VM child and its parent): kcmp(KCMP_VM)."""
    return check(lib.wpd_kcmp(pid1, pid2, KCMP_VM), pid2, "kcmp(KCMP_VM)") == 0
