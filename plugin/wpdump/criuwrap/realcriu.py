"""Finding the real CRIU that wpdump-criu wraps (never wpdump-criu itself)."""

from __future__ import annotations

import errno
import os
import sys

from ..errors import WpdumpError

ENV = "WPDUMP_REAL_CRIU"


class NoRealCriu(WpdumpError):
    """No usable real CRIU binary."""


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def find(setting: str | None = None, argv0: str | None = None) -> str:
    """The real CRIU: ``setting`` (``--criu-bin``), else $WPDUMP_REAL_CRIU, else the ``criu`` that tools/setup
    provisions next to the running interpreter (the venv's bin/criu)."""
    path = setting or os.environ.get(ENV) or os.path.join(os.path.dirname(sys.executable), "criu")
    me = os.path.abspath(argv0 or sys.argv[0])
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise NoRealCriu(f"the real CRIU {path} is not an executable file (set ${ENV})", errno=errno.ENOENT)
    if os.path.exists(me) and _same_file(path, me):
        raise NoRealCriu(f"the real CRIU {path} is wpdump-criu itself (set ${ENV} to CRIU's binary)",
                         errno=errno.ELOOP)
    return path
