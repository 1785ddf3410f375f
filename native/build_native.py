"""cffi out-of-line API-mode build of ``wpdump._native`` from native/*.c."""

import pathlib
import re

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent


def _cdef() -> str:
    """The header without preprocessor lines: cffi's cdef parser takes plain declarations."""
    text = (HERE / "wpdump_native.h").read_text()
    return "\n".join(line for line in text.splitlines() if not re.match(r"\s*#", line))


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "wpdump._native",
    '#include "wpdump_native.h"',
    sources=[str(HERE / "wpdump_native.c")],
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
