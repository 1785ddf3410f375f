"""The target's VMAs: /proc/PID/maps and smaps VmFlags, the tracking policy, layout changes."""

from __future__ import annotations

import bisect
import enum
import itertools
from dataclasses import dataclass
from typing import NamedTuple

from .process import read_proc

# VMAs the kernel provides itself: UFFDIO_REGISTER refuses them (docs/kernel.md rule 12) and
# process_vm_readv cannot read [vvar*]/[vsyscall]; CRIU recreates them at restore too.
KERNEL_VMAS = ("[vvar]", "[vvar_vclock]", "[vsyscall]")
SECRETMEM = "/secretmem (deleted)"  # how maps names a memfd_secret mapping


class Policy(enum.Enum):
    """What a harvest does with a VMA."""

    TRACK = "track"  # registered for async write-protect; only written pages are reported
    WHOLE = "whole"  # its present pages are reported every round (writes can be invisible)
    SKIP = "skip"  # never reported


class Vma(NamedTuple):
    """One line of /proc/PID/maps (a named tuple: a process can have 65,530 VMAs; built, hashed, compared and
    pickled every round, a tuple costs a fraction of a frozen dataclass)."""

    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    path: str

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def anonymous(self) -> bool:
        """Anonymous private memory (heap, stack, anon mmap): a page that is not present is zero."""
        return self.inode == 0 and not self.shared and not self.path.startswith("/")

    @property
    def secret(self) -> bool:
        """memfd_secret memory: removed from the kernel's direct map, nobody but its process can read it."""
        return self.shared and self.path == SECRETMEM

    @property
    def identity(self) -> tuple:
        """What stays the same when the VMA is split, grown or moved (not its addresses)."""
        return (self.dev, self.inode, self.path, self.shared)

    def pgoff_at(self, addr: int) -> int:
        """The file (or anon) page offset mapped at ``addr``; mremap keeps it for anon VMAs."""
        return (self.offset + addr - self.start) >> 12

    def __str__(self) -> str:
        name = f" {self.path}" if self.path else ""
        return f"{self.start:#x}-{self.end:#x} {self.perms}{name}"


_tuple_new = tuple.__new__  # builds a Vma without namedtuple's Python-level __new__ (a third of read_maps)


def from_tuples(rows: list[tuple]) -> list[Vma]:
    """Vmas from plain tuples of their seven fields (as Tracker.export_state keeps them)."""
    return [_tuple_new(Vma, r) for r in rows]


def parse_maps_line(line: str) -> Vma:
    """Parse one /proc/PID/maps line."""
    parts = line.split(maxsplit=5)
    lo, _, hi = parts[0].partition("-")
    path = parts[5].rstrip("\n") if len(parts) > 5 else ""
    return _tuple_new(Vma, (int(lo, 16), int(hi, 16), parts[1], int(parts[2], 16), parts[3], int(parts[4]), path))


def read_maps(pid: int) -> list[Vma]:
    """All VMAs of ``pid`` in address order."""
    return [parse_maps_line(line) for line in read_proc(pid, "maps").decode().splitlines()]


def read_vmflags(pid: int) -> dict[int, frozenset[str]]:
    """VmFlags of every VMA from /proc/PID/smaps, keyed by start address (costly: use on new VMAs)."""
    data = read_proc(pid, "smaps")
    # VmFlags is the last line of each VMA's block and the next VMA's "start-end ..." line follows it;
    # a path cannot break this (maps escapes newlines in names). Split per VMA, not per line (~25 a VMA).
    blocks = data.split(b"\nVmFlags: ")
    flags: dict[int, frozenset[str]] = {}
    sets: dict[bytes, frozenset[str]] = {}  # most VMAs share a few flag lines
    head = blocks[0]
    for block in blocks[1:]:
        line, _, rest = block.partition(b"\n")
        fs = sets.get(line)
        if fs is None:
            fs = sets[line] = frozenset(line.decode().split())
        flags[int(head[: head.index(b"-")], 16)] = fs
        head = rest
    return flags


def policy_for(vma: Vma, vmflags: frozenset[str]) -> tuple[Policy, str]:
    """Decide how a VMA is handled, with the reason shown to users."""
    if vma.path in KERNEL_VMAS:
        return Policy.SKIP, "kernel-provided mapping"
    if vmflags & {"io", "pf"}:
        return Policy.SKIP, "device (VM_IO/VM_PFNMAP) mapping"
    if vma.secret:
        return Policy.SKIP, "memfd_secret memory: nothing can read it (an iteration refuses it)"
    if vma.path == "[vdso]":
        return Policy.WHOLE, "[vdso] cannot be registered (docs/kernel.md rule 12)"
    if vma.shared:
        return Policy.WHOLE, "shared mapping: writes through other mappers are invisible (docs/kernel.md rule 7)"
    if "dp" in vmflags:
        return Policy.WHOLE, "MAP_DROPPABLE cannot be registered (docs/kernel.md rule 12)"
    return Policy.TRACK, "tracked"


class EventKind(enum.Enum):
    """How a VMA changed between two rounds."""

    APPEARED = "appeared"
    VANISHED = "vanished"
    MOVED = "moved"
    GROWN = "grown"
    SHRUNK = "shrunk"
    SPLIT = "split"
    PROTECTION_CHANGED = "protection-changed"
    REPLACED = "replaced"  # same place, new mapping (e.g. mmap MAP_FIXED over it)
    MERGED = "merged"  # several VMAs became one (e.g. mprotect making their flags equal again)


@dataclass(frozen=True)
class VmaEvent:
    """A change of the layout: ``old`` is the VMA before (None when it appeared), ``new`` after."""

    kind: EventKind
    old: Vma | None
    new: Vma | None

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.old or ''}{' -> ' if self.old and self.new else ''}{self.new or ''}"


class _Index:
    """VMAs sorted by start for overlap queries in O(log n + k) (a /proc/PID/maps layout is sorted and disjoint)."""

    def __init__(self, vmas: list[Vma]) -> None:
        self.vmas = sorted(vmas, key=lambda o: o.start)  # stable: the order of equal starts is kept
        self.starts = [o.start for o in self.vmas]
        self.max_ends = list(itertools.accumulate((o.end for o in self.vmas), max))

    def overlapping(self, start: int, end: int) -> list[Vma]:
        """The VMAs meeting [start, end), in address order."""
        lo = bisect.bisect_right(self.max_ends, start)  # every VMA before lo ends at or before start
        hi = bisect.bisect_left(self.starts, end, lo)
        return [o for o in self.vmas[lo:hi] if start < o.end]


def _split_at_fresh(new: list[Vma], fresh: set[tuple[int, int]]) -> list[Vma]:
    """Registering a fresh VMA can merge it into a tracked neighbour: cut the merged VMA back into
    the pieces the harvest saw, so that the fresh piece is still recognised as created."""
    bounds = sorted({x for s, e in fresh for x in (s, e)})
    out: list[Vma] = []
    for v in new:
        lo = bisect.bisect_right(bounds, v.start)
        hi = bisect.bisect_left(bounds, v.end, lo)
        if lo == hi:
            out.append(v)
            continue
        cuts = [v.start, *bounds[lo:hi], v.end]
        out.extend(
            v._replace(start=a, end=b, offset=v.offset + (a - v.start))
            for a, b in zip(cuts, cuts[1:], strict=False)
        )
    return out


def diff_layouts(old: list[Vma], new: list[Vma], fresh: set[tuple[int, int]]) -> list[VmaEvent]:
    """Events turning layout ``old`` into ``new`` (both /proc/PID/maps layouts: sorted, disjoint); ``fresh``
    holds (start, end) of new VMAs that were found unregistered, i.e. newly created mappings rather than
    in-place changes of tracked ones.

    O(n + k log k) for n VMAs of which k changed: a VMA found again unchanged meets no changed one (the
    layouts are disjoint), so only the changed ones are indexed and compared."""
    if fresh:
        new = _split_at_fresh(new, fresh)
    old_keys = set(old)  # a Vma is its whole maps line: equal means unchanged
    same = {v for v in new if v in old_keys and (not fresh or (v.start, v.end) not in fresh)}
    old = [o for o in old if o not in same]
    new = [v for v in new if v not in same]
    if not old and not new:
        return []
    old_idx, new_idx = _Index(old), _Index(new)
    pos = {id(o): i for i, o in enumerate(old)}
    matched = bytearray(len(old))  # old VMAs seen again (changed in place, or replaced)

    def match(vs: list[Vma]) -> None:
        for o in vs:
            matched[pos[id(o)]] = 1

    events: list[VmaEvent] = []
    created: list[Vma] = []
    for v in new:
        over = old_idx.overlapping(v.start, v.end)
        if (v.start, v.end) in fresh:
            created.append(v)
            if over:
                events.append(VmaEvent(EventKind.REPLACED, over[0], v))
                match(over)
            continue
        match(over)
        if not over:
            events.append(VmaEvent(EventKind.APPEARED, None, v))
        elif len(over) == 1 and (over[0].start, over[0].end) == (v.start, v.end):
            events.append(VmaEvent(EventKind.PROTECTION_CHANGED, over[0], v))
        elif v.start < min(o.start for o in over) or v.end > max(o.end for o in over):
            events.append(VmaEvent(EventKind.GROWN, over[0], v))
        elif len(over) > 1:
            # exactly the span of several old VMAs: they merged (a split VMA made uniform again)
            events.extend(VmaEvent(EventKind.MERGED, o, v) for o in over)
            events.extend(VmaEvent(EventKind.PROTECTION_CHANGED, o, v) for o in over if o.perms != v.perms)
        else:
            o = over[0]
            siblings = new_idx.overlapping(o.start, o.end)
            kind = EventKind.SPLIT if len(siblings) > 1 else EventKind.SHRUNK
            events.append(VmaEvent(kind, o, v))
            if v.perms != o.perms:
                events.append(VmaEvent(EventKind.PROTECTION_CHANGED, o, v))
    gone = [i for i in range(len(old)) if not matched[i]]
    by_shape: dict[tuple, list[int]] = {}  # gone VMAs by what a move keeps, in layout order
    for i in reversed(gone):
        o = old[i]
        by_shape.setdefault((o.size, o.identity, o.offset), []).append(i)
    # the VMA ending where a created one starts, unchanged or not (disjoint: at most one)
    by_end = {o.end: o for o in old_keys} if created else {}
    for v in created:
        if old_idx.overlapping(v.start, v.end):
            continue
        srcs = by_shape.get((v.size, v.identity, v.offset))
        if srcs:
            i = srcs.pop()
            matched[i] = 1
            events.append(VmaEvent(EventKind.MOVED, old[i], v))
            continue
        prev = by_end.get(v.start)
        if prev is not None and prev.identity != v.identity:
            prev = None
        if prev is not None and prev.perms == v.perms and (v.inode == 0 or prev.pgoff_at(prev.end) == v.offset >> 12):
            events.append(VmaEvent(EventKind.GROWN, prev, v))  # e.g. brk: a new VMA beside the heap
        else:
            events.append(VmaEvent(EventKind.APPEARED, None, v))
    events.extend(VmaEvent(EventKind.VANISHED, old[i], None) for i in gone if not matched[i])
    return events
