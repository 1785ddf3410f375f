"""Bundled C workloads (plugin/wpdump/workloads/NAME.c), compiled on first use into a cache dir."""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess

from .errors import WpdumpError

SOURCES = pathlib.Path(__file__).parent / "workloads"


class BuildError(WpdumpError):
    """A C helper could not be compiled (no gcc, or a compile error)."""


def cache_dir() -> pathlib.Path:
    """$XDG_CACHE_HOME/wpdump, or ~/.cache/wpdump."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "wpdump"


def compile_c(src: pathlib.Path, name: str | None = None, *, out_dir: pathlib.Path | None = None) -> pathlib.Path:
    """Compile ``src`` with gcc -O2 -pthread into the cache dir, keyed by the source's content: a checkout
    with other sources (another branch, another clone) never runs a stale executable."""
    src = pathlib.Path(src)
    if not src.is_file():
        raise BuildError(f"no such source file: {src}")
    out_dir = out_dir or cache_dir()
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    exe = out_dir / f"{name or src.stem}-{digest}"
    if exe.exists():
        return exe
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BuildError(f"gcc not found: it is needed to build {src.name} (apt-get install gcc libc6-dev)")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = exe.with_name(f".{exe.name}.{os.getpid()}.tmp")
    res = subprocess.run(
        [gcc, "-O2", "-pthread", "-Wall", "-o", str(tmp), str(src)], capture_output=True, text=True
    )
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        detail = (res.stderr or res.stdout).strip().splitlines()
        raise BuildError(f"gcc failed on {src}: {detail[0] if detail else f'exit {res.returncode}'}")
    os.replace(tmp, exe)  # atomic: concurrent builders never see a half-written executable
    return exe


def build(name: str) -> pathlib.Path:
    """The executable of bundled workload ``name`` (plugin/wpdump/workloads/NAME.c), built if needed."""
    return compile_c(SOURCES / f"{name}.c", name)
