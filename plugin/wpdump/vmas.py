"""The target's VMAs: /proc/PID/maps and smaps VmFlags, the tracking policy, layout changes."""

from __future__ import annotations

import dataclasses
import enum
import errno
from dataclasses import dataclass

from .errors import NoSuchProcess, from_errno

# VMAs the kernel provides itself: UFFDIO_REGISTER refuses them (docs/kernel.md rule 12) and
# process_vm_readv cannot read [vvar*]/[vsyscall]; CRIU recreates them at restore too.
KERNEL_VMAS = ("[vvar]", "[vvar_vclock]", "[vsyscall]")
SECRETMEM = "/secretmem (deleted)"  # how maps names a memfd_secret mapping


class Policy(enum.Enum):
    """What a harvest does with a VMA."""

    TRACK = "track"  # registered for async write-protect; only written pages are reported
    WHOLE = "whole"  # its present pages are reported every round (writes can be invisible)
    SKIP = "skip"  # never reported


@dataclass(frozen=True)
class Vma:
    """One line of /proc/PID/maps."""

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


def parse_maps_line(line: str) -> Vma:
    """Parse one /proc/PID/maps line."""
    parts = line.split(maxsplit=5)
    lo, hi = parts[0].split("-")
    path = parts[5].rstrip("\n") if len(parts) > 5 else ""
    return Vma(int(lo, 16), int(hi, 16), parts[1], int(parts[2], 16), parts[3], int(parts[4]), path)


def read_maps(pid: int) -> list[Vma]:
    """All VMAs of ``pid`` in address order."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return [parse_maps_line(line) for line in f]
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcess(f"no such process: {pid}", pid=pid, errno=errno.ESRCH) from None
    except PermissionError as e:
        raise from_errno(e.errno, pid, "read the memory map of") from None


def read_vmflags(pid: int) -> dict[int, frozenset[str]]:
    """VmFlags of every VMA from /proc/PID/smaps, keyed by start address (costly: use on new VMAs)."""
    flags: dict[int, frozenset[str]] = {}
    start = None
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if line.startswith("VmFlags:"):
                    if start is not None:
                        flags[start] = frozenset(line.split()[1:])
                elif "-" in line.split(maxsplit=1)[0] and not line.split(maxsplit=1)[0].endswith(":"):
                    start = int(line.split("-", 1)[0], 16)
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcess(f"no such process: {pid}", pid=pid, errno=errno.ESRCH) from None
    except PermissionError as e:
        raise from_errno(e.errno, pid, "read the memory map of") from None
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


def _overlapping(vmas: list[Vma], v: Vma) -> list[Vma]:
    return [o for o in vmas if o.start < v.end and v.start < o.end]


def _split_at_fresh(new: list[Vma], fresh: set[tuple[int, int]]) -> list[Vma]:
    """Registering a fresh VMA can merge it into a tracked neighbour: cut the merged VMA back into
    the pieces the harvest saw, so that the fresh piece is still recognised as created."""
    out: list[Vma] = []
    for v in new:
        cuts = sorted({v.start, v.end} | {x for s, e in fresh for x in (s, e) if v.start < x < v.end})
        if len(cuts) == 2:
            out.append(v)
            continue
        out.extend(
            dataclasses.replace(v, start=lo, end=hi, offset=v.offset + (lo - v.start))
            for lo, hi in zip(cuts, cuts[1:], strict=False)
        )
    return out


def diff_layouts(old: list[Vma], new: list[Vma], fresh: set[tuple[int, int]]) -> list[VmaEvent]:
    """Events turning layout ``old`` into ``new``; ``fresh`` holds (start, end) of new VMAs that were
    found unregistered, i.e. newly created mappings rather than in-place changes of tracked ones."""
    new = _split_at_fresh(new, fresh)
    old_keys = {(o.start, o.end, o.perms, o.offset, o.identity) for o in old}
    events: list[VmaEvent] = []
    matched_old: set[Vma] = set()
    created: list[Vma] = []
    for v in new:
        if (v.start, v.end, v.perms, v.offset, v.identity) in old_keys and (v.start, v.end) not in fresh:
            matched_old.update(o for o in old if (o.start, o.end) == (v.start, v.end))
            continue
        over = _overlapping(old, v)
        if (v.start, v.end) in fresh:
            created.append(v)
            if over:
                events.append(VmaEvent(EventKind.REPLACED, over[0], v))
                matched_old.update(over)
            continue
        matched_old.update(over)
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
            siblings = _overlapping(new, o)
            kind = EventKind.SPLIT if len(siblings) > 1 else EventKind.SHRUNK
            events.append(VmaEvent(kind, o, v))
            if v.perms != o.perms:
                events.append(VmaEvent(EventKind.PROTECTION_CHANGED, o, v))
    gone = [o for o in old if o not in matched_old]
    for v in created:
        if _overlapping(old, v):
            continue
        src = next(
            (o for o in gone if o.size == v.size and o.identity == v.identity and o.offset == v.offset), None
        )
        if src is not None:
            gone.remove(src)
            events.append(VmaEvent(EventKind.MOVED, src, v))
            continue
        prev = next((o for o in old if o.end == v.start and o.identity == v.identity), None)
        if prev is not None and prev.perms == v.perms and (v.inode == 0 or prev.pgoff_at(prev.end) == v.offset >> 12):
            events.append(VmaEvent(EventKind.GROWN, prev, v))  # e.g. brk: a new VMA beside the heap
        else:
            events.append(VmaEvent(EventKind.APPEARED, None, v))
    events.extend(VmaEvent(EventKind.VANISHED, o, None) for o in gone)
    return events
