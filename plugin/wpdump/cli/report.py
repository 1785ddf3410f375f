"""One line per iteration, as ``wpdump pre-dump``/``dump``/``checkpoint`` and the demo print it (standard library
only: the CLI imports it before it knows what it will run)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..dump.iteration import IterationResult

HEADER = (f"{'iter':>4} {'kind':<8} {'scanned':>9} {'written':>9} {'parent':>9} {'zeroed':>8} {'MiB':>9} "
          f"{'ms':>9} {'frozen ms':>9}")


def row(n: int | str, r: IterationResult) -> str:
    """The line of iteration ``n`` under :data:`HEADER`."""
    frozen = f"{r.frozen_s * 1e3:9.1f}" if r.kind == "dump" else f"{'-':>9}"
    return (f"{n!s:>4} {r.kind:<8} {r.pages_scanned:>9} {r.pages_written:>9} {r.pages_parent:>9} "
            f"{r.pages_zeroed:>8} {r.bytes_written / 2**20:>9.1f} {r.total_s * 1e3:>9.1f} {frozen}")
