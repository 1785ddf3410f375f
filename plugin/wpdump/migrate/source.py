"""``wpdump migrate``: pre-dump iterations streamed to ``wpdump serve`` while the tree runs, then ``criu dump`` (with
wpdump's hook, ``--leave-stopped``) streamed as the final iteration; the source tree ends only once the destination
answered with the restored pid, and resumes on every failure before that."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ..dump import iteration
from ..dump.convergence import Convergence, PHaulPolicy
from ..errors import MigrationError, WpdumpError
from ..images import format as images
from ..images.chain import read_image_file
from . import action, lazy, tree
from . import pageserver as ps
from . import protocol as wp
from .guard import Guard
from .serve import find_tool, last_error

DUMP_TIMEOUT = 600.0
CONNECT_TIMEOUT = 30.0
_PAGES = re.compile(r"pages-\d+\.img")
_HOOK_DONE = re.compile(r"wpdump criu-hook: pid \d+: (\d+) of (\d+) pages now in the parent .* in ([0-9.]+) ms")


@dataclass
class Sent:
    """One iteration on the wire."""

    n: int
    kind: str
    pages: int = 0
    page_bytes: int = 0
    file_bytes: int = 0
    dump_s: float = 0.0
    send_s: float = 0.0

    @property
    def bytes(self) -> int:
        return self.page_bytes + self.file_bytes


@dataclass
class Summary:
    pid: int
    restored_pid: int
    images_dir: str
    iterations: list[Sent] = field(default_factory=list)
    stop_reason: str = ""
    total_s: float = 0.0
    downtime_s: float = 0.0
    criu_dump_s: float = 0.0
    rewrite_s: float = 0.0
    transfer_s: float = 0.0
    restore_s: float = 0.0
    hook: str = ""

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.iterations)

    def as_dict(self) -> dict:
        return {**asdict(self), "bytes": self.bytes}


def send_iteration(sk: socket.socket, path: str, n: int, final: bool) -> Sent:
    """One images directory: its pagemaps as page-server IOVs (pages from the pages files), then every other
    regular file as a FILE frame, then COMMIT."""
    sent = Sent(n, "dump" if final else "pre-dump")
    t0 = time.perf_counter()
    parent = n - 1 if os.path.islink(os.path.join(path, "parent")) else 0
    ps.send_iov(sk, wp.WP_ITER, 1 if final else 0, n, parent)
    names = sorted(os.listdir(path))
    for name in names:
        dst_id = ps.dst_id_of(name)
        if dst_id is None:
            continue
        pages_id, entries = images.decode_pagemap(read_image_file(path, name), os.path.join(path, name))
        pages_path = os.path.join(path, images.pages_file_name(pages_id))
        fd = os.open(pages_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            wp.open2(sk, dst_id)
            sent.page_bytes += ps.send_pagemap(sk, dst_id, entries, fd, pages_path)
        finally:
            os.close(fd)
    wp.close(sk)
    for name in names:
        full = os.path.join(path, name)
        st = os.lstat(full)
        if ps.dst_id_of(name) is not None or _PAGES.fullmatch(name) or not stat.S_ISREG(st.st_mode) \
                or name.endswith(".log") or name.startswith("."):  # hidden: the hook's files on their way out
            continue
        wp.check_name(name)
        raw = name.encode()
        fd = os.open(full, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            ps.send_iov(sk, wp.WP_FILE, len(raw), st.st_size)
            sk.sendall(raw)
            ps.send_from_fd(sk, fd, 0, st.st_size, full)
        finally:
            os.close(fd)
        sent.file_bytes += st.st_size
    ps.send_iov(sk, wp.WP_COMMIT)
    wp.recv_reply(sk, f"iteration {n}")
    sent.send_s = time.perf_counter() - t0
    sent.pages = sent.page_bytes // ps.PAGE
    return sent


def connect(address: str, port: int, timeout: float) -> socket.socket:
    try:
        sk = socket.create_connection((address, port), timeout=CONNECT_TIMEOUT)
    except OSError as e:
        raise MigrationError(f"cannot connect to {address}:{port}: {e.strerror or e}", errno=e.errno) from None
    sk.settimeout(timeout)
    sk.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ps.send_iov(sk, wp.WP_HELLO, wp.VERSION, wp.MAGIC)
    wp.recv_reply(sk, "HELLO")
    return sk


def criu_dump(root: int, final: str, log_path: str, script: str | None,
              started: Callable[[int], None] | None = None) -> tuple[float, str]:
    """``criu dump --leave-stopped`` (``script``: the action script, action.write; ``started`` gets CRIU's pid);
    returns its seconds and the hook's line from the log."""
    cmd = [find_tool("criu"), "dump", "-t", str(root), "-D", final, "-o", log_path, "-v4", "--leave-stopped",
           *(["--action-script", script] if script else [])]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if started is not None:
            started(p.pid)
        rc = p.wait(timeout=DUMP_TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    seconds = time.perf_counter() - t0
    if rc != 0:  # CRIU resumes the tree itself when its dump fails
        raise MigrationError(f"criu dump failed (exit {rc}): {last_error(log_path)}", pid=root, errno=errno.EIO)
    with open(log_path, errors="replace") as f:
        hook = [ln.strip() for ln in f if "wpdump criu-hook:" in ln]
    return seconds, hook[-1] if hook else ""


def migrate(
    pid: int, address: str, port: int, policy: Convergence | None = None, *, work_dir: str | None = None,
    timeout: float = 600.0, lazy_pages: bool = True, out: Callable[[str], None] = print,
) -> Summary:
    """Migrate the tree rooted at ``pid``; on success it is gone here and runs on the destination."""
    policy = policy or PHaulPolicy()
    t_start = time.perf_counter()
    local = tempfile.mkdtemp(prefix="wpdump-migrate-", dir=work_dir or "/var/tmp")
    stopped: list[int] = []
    guard: Guard | None = None
    sk: socket.socket | None = None
    try:
        sk = connect(address, port, timeout)
        history, sent = [], []
        reason = None
        while reason is None:
            n = len(history) + 1
            res = iteration.pre_dump(pid, os.path.join(local, str(n)), f"../{n - 1}" if history else None)
            history.append(res)
            s = send_iteration(sk, os.path.join(local, str(n)), n, final=False)
            s.dump_s = res.total_s
            sent.append(s)
            reason = policy.stop_reason(history)
            out(_line(s))
        out(f"wpdump migrate: final dump: {reason}")
        n = len(history) + 1
        final = os.path.join(local, str(n))
        os.mkdir(final, 0o700)
        members = tree.pids(pid)
        script, stamp = action.write(local, find_tool("wpdump-criu-hook"), rewrite=not lazy_pages)
        t_start_dump = time.time()
        stopped = members  # from here on, a failure resumes those CRIU left stopped (a failed dump resumes them)
        guard = Guard(members)  # and so does the guard should this process die before the destination confirms
        if lazy_pages:
            lz = lazy.final_dump(find_tool("criu"), pid, final, os.path.join(local, "dump.log"), script, f"../{n - 1}",
                                 guard.criu)
            t_freeze = action.frozen_at(stamp) or t_start_dump
            dump_s, rewrite_s = lz.page_server_at - t_freeze + lz.finish_s, lz.harvest_s + lz.fetch_s
            hook = (f"lazy pages: {lz.pages_fetched} of {lz.pages_lazy} read from the frozen tree, {lz.pages_parent} "
                    f"in the parent" + (f" ({lz.note})" if lz.note else ""))
        else:
            _, hook = criu_dump(pid, final, os.path.join(local, "dump.log"), script, guard.criu)
            t_freeze = action.frozen_at(stamp) or t_start_dump
            m = _HOOK_DONE.search(hook)
            rewrite_s = float(m.group(3)) / 1e3 if m else 0.0
            dump_s = time.time() - t_freeze - rewrite_s
        out(f"wpdump migrate: final dump: {hook or 'no hook output'}")
        stopped = sorted(set(members) | set(tree.pids(pid)))
        guard.watch(stopped)
        s = send_iteration(sk, final, n, final=True)
        s.dump_s = dump_s
        sent.append(s)
        ps.send_iov(sk, wp.WP_RESTORE)
        answer = json.loads(wp.recv_reply(sk, "RESTORE"))
        t_done, t_done_wall = time.perf_counter(), time.time()
        stopped = []  # the destination runs the tree now: the source must not resume
        tree.kill(pid)
        guard.done()
        guard = None
        out(_line(s))
        summary = Summary(
            pid, int(answer["pid"]), str(answer.get("images_dir", "")), sent, reason, t_done - t_start,
            t_done_wall - t_freeze, dump_s, rewrite_s, s.send_s, float(answer["restore_s"]), hook,
        )
        return summary
    except BaseException as e:  # Ctrl-C included: the source tree must not stay stopped
        notes = tree.resume(stopped) if stopped else []
        if guard is not None:
            guard.close()
        with contextlib.suppress(WpdumpError, OSError):
            iteration.untrack(pid)
        if not isinstance(e, (WpdumpError, OSError, ValueError, KeyError, subprocess.TimeoutExpired)):
            raise
        why = str(e) if isinstance(e, WpdumpError) else (getattr(e, "strerror", None) or str(e) or type(e).__name__)
        if isinstance(e, (socket.timeout, TimeoutError)):
            why = f"no answer from {address}:{port} within {timeout:.0f} s"
        elif isinstance(e, (ConnectionError, BrokenPipeError)):
            why = f"connection to {address}:{port} lost: {why}"
        state = "the source tree runs on" + (f" (resuming: {'; '.join(notes)})" if notes else "")
        raise MigrationError(f"migration of pid {pid} failed: {why}; {state}", pid=pid,
                             errno=getattr(e, "errno", None) or errno.EIO) from None
    finally:
        if sk is not None:
            sk.close()
        shutil.rmtree(local, ignore_errors=True)


def _line(s: Sent) -> str:
    rate = s.bytes / s.send_s / 1e6 if s.send_s > 0 else 0.0
    return (f"{s.kind} {s.n}: {s.pages} pages, {s.bytes / 2**20:.1f} MiB sent, {(s.dump_s + s.send_s) * 1e3:.0f} ms "
            f"(dump {s.dump_s * 1e3:.0f}, send {s.send_s * 1e3:.0f}), {rate:.0f} MB/s")


def summary_lines(s: Summary) -> list[str]:
    return [
        f"wpdump migrate: pid {s.pid} runs on the destination as pid {s.restored_pid} ({s.images_dir})",
        f"total {s.total_s:.2f} s, {s.bytes / 2**20:.1f} MiB sent in {len(s.iterations)} iterations",
        f"downtime {s.downtime_s * 1e3:.0f} ms: criu dump {s.criu_dump_s * 1e3:.0f} ms, rewrite "
        f"{s.rewrite_s * 1e3:.0f} ms, transfer {s.transfer_s * 1e3:.0f} ms, restore {s.restore_s * 1e3:.0f} ms",
    ]
