"""An independent reader of image chains for tests: pycriu decodes the pagemaps, plain Python walks
the ``parent`` links, and the result is compared with /proc/PID/mem page by page."""

from __future__ import annotations

import json
import os

import pycriu.images

PAGE = 4096
ZERO = bytes(PAGE)
PE_PARENT, PE_PRESENT = 1, 4
KERNEL_VMAS = ("[vvar]", "[vvar_vclock]", "[vsyscall]")


def load_pagemap(d: str, pid: int | str) -> tuple[int, list[dict]]:
    """(pages_id, entries) of d/pagemap-PID.img as pycriu reads it."""
    with open(os.path.join(d, f"pagemap-{pid}.img"), "rb") as f:
        img = pycriu.images.load(f)
    assert img["magic"] == "PAGEMAP"
    head, entries = img["entries"][0], img["entries"][1:]
    return head["pages_id"], entries


def reconstruct(top: str, pid: int) -> tuple[dict[int, bytes], dict[int, int]]:
    """Every page the chain's top lists: address -> content, and address -> depth of the supplying level."""
    out: dict[int, bytes] = {}
    depth: dict[int, int] = {}
    want: set[int] | None = None  # pages still to resolve (None: the top's own list)
    d, level = top, 0
    while d is not None:
        pages_id, entries = load_pagemap(d, pid)
        listed: set[int] = set()
        with open(os.path.join(d, f"pages-{pages_id}.img"), "rb") as f:
            for e in entries:
                n = e["nr_pages"]
                for i in range(n):
                    p = e["vaddr"] + i * PAGE
                    listed.add(p)
                    if e["flags"] & PE_PRESENT:
                        if want is None or p in want:
                            out[p] = f.read(PAGE)
                            depth[p] = level
                        else:
                            f.seek(PAGE, 1)
        if want is None:
            want = {
                p for e in entries if e["flags"] & PE_PARENT
                for p in range(e["vaddr"], e["vaddr"] + e["nr_pages"] * PAGE, PAGE)
            }
        else:
            assert want <= listed, f"{d}: pages {sorted(want - listed)[:4]} marked in-parent are not in the parent"
            want = {p for p in want if p not in out}
        link = os.path.join(d, "parent")
        if not want:
            break
        assert os.path.islink(link), f"{d}: in-parent pages but no parent link"
        d = os.path.normpath(os.path.join(d, os.readlink(link)))
        level += 1
    return out, depth


def shared_pages(top: str, pid: int) -> dict[int, bytes]:
    """The pages of ``pid``'s shared mappings, from the shared objects' images (pagemap-shmem-SHMID.img, vaddr =
    offset in the object) through the windows wpdump.json records for the process."""
    try:
        with open(os.path.join(top, "wpdump.json")) as f:
            meta = json.load(f)
    except FileNotFoundError:
        return {}
    windows = meta.get("processes", {}).get(str(pid), {}).get("shared", [])
    out: dict[int, bytes] = {}
    for start, end, offset, shmid in windows:
        with open(os.path.join(top, f"pagemap-shmem-{shmid}.img"), "rb") as f:
            img = pycriu.images.load(f)
        head, entries = img["entries"][0], img["entries"][1:]
        with open(os.path.join(top, f"pages-{head['pages_id']}.img"), "rb") as f:
            for e in entries:
                assert e["flags"] == PE_PRESENT, e  # objects are stored whole, never in a parent
                for i in range(e["nr_pages"]):
                    data = f.read(PAGE)
                    addr = start + e["vaddr"] + i * PAGE - offset
                    if start <= addr < end:
                        out[addr] = data
    return out


def maps(pid: int) -> list[tuple[int, int, str, int, int, str]]:
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            path = parts[5].strip() if len(parts) > 5 else ""
            out.append((lo, hi, parts[1], int(parts[2], 16), int(parts[4]), path))
    return out


def compare_with_memory(top: str, pid: int) -> int:
    """Assert every page of every dumped VMA equals the chain (absent: zero, or the file's content in
    a private file mapping). The target must be stopped. Returns the pages compared."""
    image, _ = reconstruct(top, pid)
    image.update(shared_pages(top, pid))
    bad: list[str] = []
    n = 0
    mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for lo, hi, perms, off, inode, path in maps(pid):
            if path in KERNEL_VMAS or path == "/secretmem (deleted)":  # memfd_secret: nothing can read it
                continue
            private_file = perms[3] == "p" and (inode != 0 or path.startswith("/"))
            fobj = None
            if private_file:
                fobj = os.open(f"/proc/{pid}/map_files/{lo:x}-{hi:x}", os.O_RDONLY)
            try:
                for p in range(lo, hi, PAGE):
                    got = os.pread(mem, PAGE, p)
                    if p in image:
                        want = image[p]
                    elif fobj is not None:
                        want = os.pread(fobj, PAGE, off + p - lo).ljust(PAGE, b"\0")
                    else:
                        want = ZERO
                    n += 1
                    if got != want and len(bad) < 8:
                        bad.append(f"{p:#x} in {lo:#x}-{hi:#x} {perms} {path} ({'listed' if p in image else 'absent'})")
            finally:
                if fobj is not None:
                    os.close(fobj)
    finally:
        os.close(mem)
    assert not bad, "pages differ from the process:\n" + "\n".join(bad)
    return n
