"""When to stop pre-dumping and take the final dump: small pluggable convergence policies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .iteration import IterationResult


class Convergence(Protocol):
    """Decides after each pre-dump whether the next iteration is the final dump."""

    def stop_reason(self, history: list[IterationResult]) -> str | None:
        """None to go on pre-dumping, else why the final dump comes now."""


@dataclass
class PHaulPolicy:
    """P.Haul's rule: stop when the dirty set is small, when it grows, or after enough iterations."""

    max_iterations: int = 8
    dirty_pages: int = 64
    growth: float = 0.10

    def stop_reason(self, history: list[IterationResult]) -> str | None:
        last = history[-1]
        if len(history) >= self.max_iterations:
            return f"{len(history)} pre-dumps (the maximum)"
        if len(history) >= 2 and last.pages_written <= self.dirty_pages:
            return f"converged: {last.pages_written} dirty pages <= {self.dirty_pages}"
        if len(history) >= 3:
            prev = history[-2].pages_written
            if last.pages_written > prev * (1 + self.growth):
                return f"the dirty set grows: {prev} -> {last.pages_written} pages (> {self.growth:.0%})"
        return None


@dataclass
class LXDPolicy:
    """LXD's rule: stop when at least ``skipped`` of the pages could be taken from the parent."""

    max_iterations: int = 8
    skipped: float = 0.70

    def stop_reason(self, history: list[IterationResult]) -> str | None:
        last = history[-1]
        if len(history) >= self.max_iterations:
            return f"{len(history)} pre-dumps (the maximum)"
        total = last.pages_parent + last.pages_written
        if len(history) >= 2 and total and last.pages_parent / total >= self.skipped:
            return f"converged: {last.pages_parent / total:.0%} of the pages skipped as in-parent >= {self.skipped:.0%}"
        return None


POLICIES = {"phaul": PHaulPolicy, "lxd": LXDPolicy}
