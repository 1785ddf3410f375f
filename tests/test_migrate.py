"""Live migration between two "hosts" (network namespaces joined by a veth pair, 1 Gbit/s tbf): wpdump migrate ->
wpdump serve -> criu restore; CRIU's own page server receives our pages; faults leave the source running."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ResultLines, compile_target, require_kernel
from netns import Hosts
from wpdump.errors import ProtocolError
from wpdump.images import format as images
from wpdump.migrate import pageserver as ps
from wpdump.migrate import protocol as wp

BIN = pathlib.Path(sys.executable).parent
CRIU, CRIT, WPDUMP = BIN / "criu", BIN / "crit", BIN / "wpdump"
PORT = 7070
PAGE = 4096


@pytest.fixture
def hosts():
    require_kernel()
    h = Hosts()
    yield h
    h.remove()


@pytest.fixture(scope="module")
def selfcheck_exe(build_dir):
    if not CRIU.exists():
        pytest.fail(f"{CRIU} is missing: tools/setup provisions CRIU 4.x")
    return compile_target("selfcheck", build_dir)


class Workload(ResultLines):
    """selfcheck in its own pid namespace (as a container's init) on the src host: writes its pages all the time,
    checks them against its own checksums on SIGUSR1."""

    def __init__(self, hosts: Hosts, exe: pathlib.Path, tmp: pathlib.Path, mib: int, per_tick: int) -> None:
        self.result = tmp / "result"
        self.proc = subprocess.Popen(
            hosts.run(hosts.src, "unshare", "--pid", "--fork", "setsid", exe, mib, self.result, per_tick),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.wait_line("ready", timeout=60)
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
            [self.pid] = [int(x) for x in f.read().split()]



    def self_check(self, pid: int) -> int:
        """SIGUSR1 to ``pid`` (the source or the restored copy): it must answer "ok TICKS"; returns TICKS."""
        n = len(self.lines())
        os.kill(pid, signal.SIGUSR1)
        line = self.wait_line("ok", after=n)
        assert line.startswith("ok "), line
        return int(line.split()[1])

    def runs_on(self, pid: int) -> None:
        """It passes its self-check twice, its tick counter advancing in between: alive and intact."""
        first = self.self_check(pid)
        deadline = time.time() + 30
        while time.time() < deadline:
            time.sleep(0.05)
            if self.self_check(pid) > first:
                return
        raise AssertionError(f"pid {pid} does not advance")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            with open(os.devnull) as _:
                pass
            if os.path.exists(f"/proc/{self.pid}"):
                os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture
def workload(hosts, selfcheck_exe, tmp_path):
    made: list[Workload] = []

    def start(mib: int = 64, per_tick: int = 2) -> Workload:
        made.append(Workload(hosts, selfcheck_exe, tmp_path, mib, per_tick))
        return made[-1]

    yield start
    for w in made:
        w.stop()


class Server:
    """``wpdump serve --once`` on the dst host."""

    def __init__(self, hosts: Hosts, dest: pathlib.Path, *extra: str) -> None:
        self.dest = dest
        dest.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            hosts.run(hosts.dst, WPDUMP, "serve", "-D", dest, "--address", hosts.dst_ip, "--port", PORT, "--once",
                      *extra),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert "listening on" in line, (line, self.proc.stderr.read() if self.proc.poll() is not None else "")

    def finish(self) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=300)
        return self.proc.returncode, out, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def visible(self) -> list[str]:
        """What DIR holds apart from hidden in-progress directories."""
        return sorted(n for n in os.listdir(self.dest) if not n.startswith("."))


def migrate(hosts: Hosts, pid: int, *extra: object, address: str | None = None, port: int = PORT) \
        -> subprocess.CompletedProcess:
    return subprocess.run(
        hosts.run(hosts.src, WPDUMP, "migrate", "-t", pid, "--address", address or hosts.dst_ip, "--port", port,
                  *extra),
        capture_output=True, text=True, timeout=600)


def restored_pid(out: str) -> int:
    line = next(ln for ln in out.splitlines() if "runs on the destination as pid" in ln)
    return int(line.split("as pid ")[1].split()[0])


def test_migrate_restores_a_running_tree_that_passes_its_self_check(hosts, workload, tmp_path):
    w = workload(mib=64, per_tick=2)  # 16384 pages, 200 pages/s: about 1 % a second
    w.runs_on(w.pid)
    srv = Server(hosts, tmp_path / "dst")
    try:
        p = migrate(hosts, w.pid, "--max-iterations", 3)
        rc, out, err = srv.finish()
    finally:
        srv.kill()
    assert p.returncode == 0, p.stderr
    assert rc == 0, err
    new = restored_pid(p.stdout)
    try:
        lines = p.stdout.splitlines()
        assert [ln.split(":")[0] for ln in lines if ln.startswith("pre-dump ")] == ["pre-dump 1", "pre-dump 2",
                                                                                     "pre-dump 3"], p.stdout
        first = next(ln for ln in lines if ln.startswith("pre-dump 1:"))
        assert int(first.split(": ")[1].split()[0]) >= 16384, first  # all of the workload's memory
        # the final dump: criu dump --lazy-pages, only the pages written since pre-dump 3 read and sent
        lazy = next(ln for ln in lines if "read from the frozen tree" in ln)
        fetched, lazy_pages = (int(x) for x in lazy.split("lazy pages: ")[1].split(" read")[0].split(" of "))
        assert lazy_pages >= 16384 and fetched < lazy_pages // 4, lazy
        final = next(ln for ln in lines if ln.startswith("dump 4:"))
        assert int(final.split(": ")[1].split()[0]) < 16384 // 4, final
        summary = next(ln for ln in lines if ln.startswith("downtime "))
        assert "criu dump" in summary and "transfer" in summary and "restore" in summary, summary
        assert "MiB sent" in next(ln for ln in lines if ln.startswith("total "))
        w.proc.wait(timeout=30)  # the source tree is gone
        assert not os.path.exists(f"/proc/{w.pid}")
        w.runs_on(new)  # the restored copy passes its self-check and keeps running
        [mig] = srv.visible()
        chain = tmp_path / "dst" / mig
        assert sorted(os.listdir(chain)) == ["1", "2", "3", "4"]
        assert os.readlink(chain / "2" / "parent") == "../1"
        assert os.readlink(chain / "4" / "parent") == "../3"  # CRIU's final dump, rewritten onto the chain
        assert f"restored pid {new}" in out
    finally:
        os.kill(new, signal.SIGKILL)


def test_migrate_without_lazy_pages_json_and_lxd_policy(hosts, workload, tmp_path):
    """The final dump by plain criu dump + wpdump's hook (full until the hook names pagemaps by vpid)."""
    w = workload(mib=16, per_tick=1)
    srv = Server(hosts, tmp_path / "dst")
    try:
        p = migrate(hosts, w.pid, "--policy", "lxd", "--max-iterations", 2, "--json", "--no-lazy-pages")
        srv.finish()
    finally:
        srv.kill()
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    try:
        assert s["pid"] == w.pid and len(s["iterations"]) <= 3 and s["bytes"] >= 16 << 20
        assert s["downtime_s"] >= s["criu_dump_s"] > 0 and s["restore_s"] > 0
        assert "now in the parent" in s["hook"], s["hook"]  # the hook rewrote CRIU's final dump onto the chain
        w.proc.wait(timeout=30)
        w.runs_on(s["restored_pid"])
    finally:
        os.kill(s["restored_pid"], signal.SIGKILL)


# ---- interop: CRIU's own page server receives one of our pre-dumps ----


def crit_pagemap(path: pathlib.Path) -> tuple[int, list[tuple[int, int, int]]]:
    p = subprocess.run([str(CRIT), "decode", "-i", str(path)], capture_output=True, text=True, timeout=60, check=True)
    d = json.loads(p.stdout)
    head, *entries = d["entries"]
    return head["pages_id"], [(e["vaddr"], e["nr_pages"], e["flags"]) for e in entries]  # crit without --pretty


def send_to(address: str, port: int, it_dir: pathlib.Path) -> None:
    """Our sender alone (no wpdump frames): OPEN2, ADD_F per entry, CLOSE, as criu dump --page-server does."""
    from wpdump.images.chain import read_image_file

    [name] = [n for n in os.listdir(it_dir) if ps.dst_id_of(n)]
    pages_id, entries = images.decode_pagemap(read_image_file(str(it_dir), name), name)
    deadline = time.time() + 30
    while True:
        try:
            sk = socket.create_connection((address, port), timeout=60)
            break
        except ConnectionRefusedError:
            assert time.time() < deadline
            time.sleep(0.05)
    with sk:
        fd = os.open(it_dir / images.pages_file_name(pages_id), os.O_RDONLY)
        try:
            assert ps.open2(sk, ps.dst_id_of(name)) is False  # no parent there
            ps.send_pagemap(sk, ps.dst_id_of(name), entries, fd, "pages")
        finally:
            os.close(fd)
        ps.close(sk)


def test_criu_page_server_receives_our_pre_dump_as_wpdump_serve_stores_it(hosts, workload, tmp_path):
    from wpdump.dump import iteration

    w = workload(mib=8, per_tick=0)
    local = tmp_path / "local"
    local.mkdir()
    iteration.pre_dump(w.pid, str(local / "1"))
    iteration.untrack(w.pid)
    criu_dir = tmp_path / "criu-ps"
    criu_dir.mkdir()
    cps = subprocess.Popen(hosts.run(hosts.dst, CRIU, "page-server", "-D", criu_dir, "--address", hosts.dst_ip,
                                     "--port", PORT, "-o", "ps.log", "-v4"), stderr=subprocess.PIPE, text=True)
    try:
        subprocess.run(hosts.run(hosts.src, sys.executable, "-c",
                                 "import sys, pathlib; sys.path.insert(0, sys.argv[1]); import test_migrate as t; "
                                 "t.send_to(sys.argv[2], int(sys.argv[3]), pathlib.Path(sys.argv[4]))",
                                 pathlib.Path(__file__).parent, hosts.dst_ip, PORT, local / "1"),
                       check=True, timeout=120, capture_output=True)
        assert cps.wait(timeout=60) == 0, (criu_dir / "ps.log").read_text()[-2000:]
    finally:
        if cps.poll() is None:
            cps.kill()
            cps.wait()
    ours = store_with_wpdump_receiver(local / "1", tmp_path / "dst")
    name = "pagemap-1.img"  # the workload is its pid namespace's init: CRIU's and wpdump's name for it
    criu_id, criu_entries = crit_pagemap(criu_dir / name)
    our_id, our_entries = crit_pagemap(ours / name)
    local_id, local_entries = crit_pagemap(local / "1" / name)
    assert criu_entries == local_entries == our_entries and sum(e[1] for e in criu_entries) >= 2048
    criu_pages = (criu_dir / images.pages_file_name(criu_id)).read_bytes()
    assert criu_pages == (local / "1" / images.pages_file_name(local_id)).read_bytes()
    assert (ours / images.pages_file_name(our_id)).read_bytes() == criu_pages
    assert sorted(os.listdir(ours)) == sorted(os.listdir(local / "1"))


def store_with_wpdump_receiver(it_dir: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    """The same iteration through wpdump's sender and serve's receiver (a socket pair: the same bytes)."""
    import threading

    from wpdump.migrate.receiver import Migration
    from wpdump.migrate.source import send_iteration

    dest.mkdir()
    a, b = socket.socketpair()
    errors: list[BaseException] = []

    def sender() -> None:
        try:
            send_iteration(a, str(it_dir), 1, final=False)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=sender)
    t.start()
    with a, b:
        mig = Migration(str(dest), 1 << 30)
        path = mig.receive_iteration(b, ps.recv_iov(b))
        wp.send_reply(b, 0)
        t.join(60)
    assert not errors, errors
    return pathlib.Path(path)


# ---- faults: the source resumes and keeps its memory, the command says why, nothing half-written ----


def check_failed(p: subprocess.CompletedProcess, w: Workload, srv: Server, want: str) -> None:
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    last = p.stderr.strip().splitlines()
    assert len(last) == 1 and last[0].startswith("wpdump: migration of pid") and want in last[0], p.stderr
    assert "the source tree runs on" in last[0]
    w.runs_on(w.pid)  # the source resumed with its memory intact
    assert srv.visible() == []


def test_destination_killed_mid_stream(hosts, workload, tmp_path):
    w = workload(mib=64, per_tick=2)
    srv = Server(hosts, tmp_path / "dst")
    src = subprocess.Popen(hosts.run(hosts.src, WPDUMP, "migrate", "-t", w.pid, "--address", hosts.dst_ip, "--port",
                                     PORT, "--max-iterations", 8), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        deadline = time.time() + 120
        while not any(n.startswith(".incoming-") and os.path.isdir(srv.dest / n / "1") for n in os.listdir(srv.dest)):
            assert time.time() < deadline and src.poll() is None
            time.sleep(0.01)
        srv.proc.send_signal(signal.SIGSTOP)  # iteration 1 is there, the final one cannot be: kill it now
        srv.kill()
        out, err = src.communicate(timeout=300)
    finally:
        srv.kill()
        if src.poll() is None:
            src.kill()
    check_failed(subprocess.CompletedProcess(src.args, src.returncode, out, err), w, srv, "connection")
    # a killed receiver leaves its hidden directory; the next serve removes it
    Server(hosts, tmp_path / "dst").kill()
    assert [n for n in os.listdir(srv.dest)] == []


CUTTER = """
import socket, sys, threading
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", int(sys.argv[1]))); ls.listen(1); print("up", flush=True)
a, _ = ls.accept(); b = socket.create_connection((sys.argv[2], int(sys.argv[3])))
limit = int(sys.argv[4]); n = [0]
def back():
    while (d := b.recv(65536)):
        a.sendall(d)
threading.Thread(target=back, daemon=True).start()
while n[0] < limit and (d := a.recv(65536)):
    b.sendall(d[: limit - n[0]]); n[0] += len(d)
import struct
for s in (a, b):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); s.close()
"""


def test_connection_cut(hosts, workload, tmp_path):
    """A relay on the source host cuts the connection (RST both ways) after 8 MiB of the first iteration."""
    w = workload(mib=64, per_tick=2)
    srv = Server(hosts, tmp_path / "dst")
    relay = subprocess.Popen(hosts.run(hosts.src, sys.executable, "-c", CUTTER, 7071, hosts.dst_ip, PORT, 8 << 20),
                             stdout=subprocess.PIPE, text=True)
    try:
        assert relay.stdout.readline().strip() == "up"
        p = migrate(hosts, w.pid, "--max-iterations", 3, address="127.0.0.1", port=7071)
        rc, out, err = srv.finish()
    finally:
        srv.kill()
        relay.kill()
        relay.wait()
    assert rc == 1 and "failed" in err, err
    check_failed(p, w, srv, "connection")


def test_destination_restore_fails(hosts, workload, tmp_path):
    """criu restore fails on the destination, after the source's final dump (here: it is told to hand the tree an
    inherited fd 7 it does not have)."""
    w = workload(mib=16, per_tick=2)
    srv = Server(hosts, tmp_path / "dst", "--restore-arg=--inherit-fd=fd[7]:wpdump-test")
    try:
        p = migrate(hosts, w.pid, "--max-iterations", 2)
        rc, out, err = srv.finish()
    finally:
        srv.kill()
    assert rc == 1 and "criu restore failed" in err, err
    check_failed(p, w, srv, "criu restore failed")
    assert "inherit fd 7" in p.stderr


def test_garbage_stream_to_serve(hosts, tmp_path):
    srv = Server(hosts, tmp_path / "dst")
    try:
        subprocess.run(hosts.run(hosts.src, sys.executable, "-c",
                                 "import socket, sys, os; "
                                 "s = socket.create_connection((sys.argv[1], int(sys.argv[2]))); "
                                 "s.sendall(os.urandom(100000)); "
                                 "s.shutdown(socket.SHUT_WR); s.recv(100)",
                                 hosts.dst_ip, PORT), timeout=60, capture_output=True)
        rc, out, err = srv.finish()
    finally:
        srv.kill()
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("wpdump: migration from 10.77.0.1 failed: "), err
    assert "HELLO" in lines[0]
    assert os.listdir(srv.dest) == []


# ---- the receiver's bounds, on a socket pair (no processes needed) ----


def receive(tmp_path: pathlib.Path, frames: bytes) -> str:
    """Feed ``frames`` to the receiver after a valid HELLO; returns the error it raised."""
    from wpdump.migrate.receiver import Migration

    a, b = socket.socketpair()
    dest = tmp_path / "dest"
    dest.mkdir(exist_ok=True)
    with a, b:
        a.sendall(frames)
        a.shutdown(socket.SHUT_WR)
        mig = Migration(str(dest), 1 << 30)
        try:
            head = ps.recv_iov(b)
            with pytest.raises(ProtocolError) as e:
                mig.receive_iteration(b, head)
        finally:
            mig.discard()
    assert os.listdir(dest) == []
    return str(e.value)


def iov(cmd: int, nr: int = 0, vaddr: int = 0, dst: int = 0, flags: int = 0) -> bytes:
    return ps.IOV.pack(ps.ps_cmd(cmd, flags), nr, vaddr, dst)


PID1, PID2 = ps.encode_dst_id(ps.PS_TYPE_PID, 1), ps.encode_dst_id(ps.PS_TYPE_PID, 2)


@pytest.mark.parametrize("frames, want", [
    (iov(wp.WP_ITER, 0, 2, 1), "bad iteration header"),  # iteration 2 first
    (iov(wp.WP_ITER, 0, 1) + iov(ps.PS_IOV_OPEN2, dst=(5 << 8) | 9), "bad page-server dst_id"),
    (iov(wp.WP_ITER, 0, 1) + iov(ps.PS_IOV_OPEN2, dst=(1 << 40) | 1), "bad page-server dst_id"),  # no such pid
    (iov(wp.WP_ITER, 0, 1) + iov(ps.PS_IOV_OPEN2, dst=0), "bad page-server dst_id"),
    (iov(wp.WP_ITER, 0, 1) + iov(ps.PS_IOV_OPEN2, dst=PID1) + iov(ps.PS_IOV_ADD_F, 1, 0x1001, PID1, 4), "no user"),
    (iov(wp.WP_ITER, 0, 1) + iov(ps.PS_IOV_OPEN2, dst=PID1) + iov(ps.PS_IOV_ADD_F, (1 << 18) + 1, 0x1000, PID1, 4),
     "PS_IOV_ADD_F of"),
    (iov(wp.WP_ITER, 0, 1) + iov(ps.PS_IOV_OPEN2, dst=PID1) + iov(ps.PS_IOV_ADD_F, 1, 0x1000, PID1, 6), "flags"),
    (iov(wp.WP_ITER, 0, 1) + iov(ps.PS_IOV_OPEN2, dst=PID1) + iov(ps.PS_IOV_ADD_F, 1, 1 << 57, PID1, 4), "no user"),
    (iov(wp.WP_ITER, 0, 1) + iov(ps.PS_IOV_OPEN2, dst=PID1) + iov(ps.PS_IOV_ADD_F, 2, 0x2000, PID1, 1),
     "without a parent"),
    (iov(wp.WP_ITER, 0, 1) + iov(ps.PS_IOV_OPEN2, dst=PID1) + iov(ps.PS_IOV_ADD_F, 2, 0x4000, PID1, 4) + b"\0" * PAGE
     * 2 + iov(ps.PS_IOV_ADD_F, 1, 0x3000, PID1, 4), "precedes"),
    (iov(wp.WP_ITER, 0, 1) + iov(ps.PS_IOV_OPEN2, dst=PID1) + iov(ps.PS_IOV_ADD_F, 4, 0x4000, PID1, 4) + b"\0" * 100,
     "ended in the middle"),
    (iov(wp.WP_ITER, 0, 1) + iov(wp.WP_FILE, 9, 3) + b"../passwd", "refusing"),
    (iov(wp.WP_ITER, 0, 1) + iov(wp.WP_FILE, 6, 3) + b"a/b.im", "refusing"),
    (iov(wp.WP_ITER, 0, 1) + iov(wp.WP_FILE, 6, 3) + b"parent", "refusing"),
    (iov(wp.WP_ITER, 0, 1) + iov(wp.WP_FILE, 11, 3) + b"pages-1.img", "refusing"),
    (iov(wp.WP_ITER, 0, 1) + iov(wp.WP_FILE, 4, 1 << 40) + b"core", "bad file header"),
    (iov(wp.WP_ITER, 0, 1) + iov(wp.WP_FILE, 4, 3) + b"core" + b"abc" + iov(wp.WP_FILE, 4, 3) + b"core", "twice"),
    (iov(wp.WP_ITER, 0, 1) + iov(wp.WP_COMMIT), "no pagemap"),
    (iov(wp.WP_ITER, 0, 1) + iov(0x77), "unexpected command"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_receiver_rejects(tmp_path, frames, want):
    assert want in receive(tmp_path, frames)


def test_receiver_writes_what_it_was_sent(tmp_path):
    from wpdump.images.chain import read_image_file
    from wpdump.migrate.receiver import Migration

    data = np.random.default_rng(1).integers(0, 256, 3 * PAGE, dtype=np.uint8).tobytes()
    frames = (iov(wp.WP_ITER, 0, 1) + iov(ps.PS_IOV_OPEN2, dst=PID1) + iov(ps.PS_IOV_ADD_F, 2, 0x10000, PID1, 4)
              + data[:2 * PAGE] + iov(ps.PS_IOV_ADD_F, 1, 0x20000, PID1, 4) + data[2 * PAGE:]
              + iov(ps.PS_IOV_OPEN2, dst=PID2) + iov(ps.PS_IOV_ADD_F, 1, 0x10000, PID2, 4) + data[:PAGE]
              + iov(ps.PS_IOV_CLOSE) + iov(wp.WP_FILE, 13, 5) + b"inventory.img" + b"hello" + iov(wp.WP_COMMIT))
    a, b = socket.socketpair()
    with a, b:
        a.sendall(frames)
        mig = Migration(str(tmp_path), 1 << 30)
        path = mig.receive_iteration(b, ps.recv_iov(b))
        assert a.recv(2) == b"\0\0" and a.recv(4) == b"\0\0\0\0"  # OPEN2 (twice): no parent; CLOSE: status 0
    assert mig.received == 4 * PAGE + 5  # pages and files, each counted once (the bound on a migration's size)
    pid_, entries = images.decode_pagemap(read_image_file(path, "pagemap-1.img"), "pagemap-1.img")
    assert entries.tolist() == [(0x10000, 2, 4), (0x20000, 1, 4)]
    assert open(os.path.join(path, images.pages_file_name(pid_)), "rb").read() == data
    assert open(os.path.join(path, "inventory.img"), "rb").read() == b"hello"
    pid_, entries = images.decode_pagemap(read_image_file(path, "pagemap-2.img"), "pagemap-2.img")
    assert pid_ == 2 and entries.tolist() == [(0x10000, 1, 4)]
    assert open(os.path.join(path, images.pages_file_name(2)), "rb").read() == data[:PAGE]


def test_a_pagemap_entry_longer_than_a_header_allows_goes_as_several(tmp_path, monkeypatch):
    """wpdump merges a whole VMA into one entry: one of 4 GiB + 4 KiB was refused by the receiver's bound."""
    import threading

    from wpdump.images.chain import read_image_file
    from wpdump.migrate.receiver import Migration

    monkeypatch.setattr(ps, "MAX_IOV_PAGES", 2)  # the bound, small: the same code path as 1 GiB
    data = np.random.default_rng(2).integers(0, 256, 5 * PAGE, dtype=np.uint8).tobytes()
    pages = tmp_path / "pages"
    pages.write_bytes(data)
    entries = np.array([(0x40000, 5, images.PE_PRESENT)], dtype=images.ENTRY_DTYPE)
    a, b = socket.socketpair()
    fd = os.open(pages, os.O_RDONLY)

    def sender() -> None:
        ps.send_iov(a, wp.WP_ITER, 0, 1)
        ps.send_iov(a, ps.PS_IOV_OPEN2, dst_id=PID1)
        ps.send_pagemap(a, PID1, entries, fd, str(pages))
        a.sendall(iov(ps.PS_IOV_CLOSE) + iov(wp.WP_FILE, 13, 0) + b"inventory.img" + iov(wp.WP_COMMIT))

    t = threading.Thread(target=sender)
    t.start()
    dest = tmp_path / "dest"
    dest.mkdir()
    with a, b:
        path = Migration(str(dest), 1 << 30).receive_iteration(b, ps.recv_iov(b))
        t.join(30)
    os.close(fd)
    pages_id, got = images.decode_pagemap(read_image_file(path, "pagemap-1.img"), "pagemap-1.img")
    assert got.tolist() == [(0x40000, 2, 4), (0x42000, 2, 4), (0x44000, 1, 4)]
    assert open(os.path.join(path, images.pages_file_name(pages_id)), "rb").read() == data


def test_migrate_a_tree_with_shared_memory(hosts, build_dir, tmp_path):
    """A prefork tree (master + 3 workers, a MAP_SHARED region) as a container: every process comes back on the
    destination and passes its self-check; the lazy final dump reads only what each process wrote since."""
    import signal as sig

    from test_trees import Prefork

    exe = compile_target("prefork", build_dir)
    t = Prefork.__new__(Prefork)  # started on the src host, in its own pid namespace
    t.result = tmp_path / "result"
    t.proc = subprocess.Popen(hosts.run(hosts.src, "unshare", "--pid", "--fork", "setsid", exe, t.result, 3, 2048, 64,
                                        1), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        t.root = Prefork._child_of(t.proc.pid)
        t.wait_for("ready", 4)
        srv = Server(hosts, tmp_path / "dst")
        try:
            p = migrate(hosts, t.root, "--max-iterations", 2)
            srv.finish()
        finally:
            srv.kill()
        assert p.returncode == 0, p.stderr
        lazy = next(ln for ln in p.stdout.splitlines() if "read from the frozen tree" in ln)
        fetched, lazy_pages = (int(x) for x in lazy.split("lazy pages: ")[1].split(" read")[0].split(" of "))
        assert lazy_pages >= 4 * 2048 and fetched < lazy_pages // 4, lazy
        t.proc.wait(timeout=30)  # the source tree is gone
        [mig] = srv.visible()
        final = tmp_path / "dst" / mig / "3"
        assert {n for n in os.listdir(final) if n.startswith("pagemap-")} >= {f"pagemap-{v}.img" for v in (1, 2, 3, 4)}
        # the shared region went as a shmem pagemap (dst_id type 2) in the pre-dumps
        first_it = os.listdir(final.parent / "1")
        assert any(n.startswith("pagemap-shmem-") for n in first_it), first_it
        t.root = restored_pid(p.stdout)
        try:
            first = {ln[0]: int(ln[2]) for ln in t.signal_all(sig.SIGUSR1, "ok")}
            assert set(first) == {"1", "2", "3", "4"}
            time.sleep(0.2)
            second = {ln[0]: int(ln[2]) for ln in t.signal_all(sig.SIGUSR1, "ok")}
            assert all(second[v] > first[v] for v in first), (first, second)  # it runs on
        finally:
            os.kill(t.root, sig.SIGKILL)
    finally:
        if t.proc.poll() is None:
            os.killpg(t.proc.pid, sig.SIGKILL)
            t.proc.wait()


LOST_TRACKING = """
import os, signal, sys
from wpdump.dump import iteration
from wpdump.dump.convergence import PHaulPolicy
from wpdump.migrate.source import migrate, summary_lines

class KillKeeperThenStop(PHaulPolicy):
    def stop_reason(self, history):
        if len(history) < 2:
            return None
        [st] = iteration.status()
        os.kill(st["keeper"], signal.SIGKILL)  # tracking is lost: nothing the chain says can be vouched for
        return "the test stops here"

s = migrate(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), KillKeeperThenStop(), out=lambda line: None)
print(s.hook)
print("\\n".join(summary_lines(s)))
"""


def test_lazy_final_dump_reads_everything_when_tracking_was_lost(hosts, workload, tmp_path):
    """The keeper dies before the final dump: the lazy final dump cannot vouch for the chain, so it reads every
    page from the frozen tree (a full final dump) and the restored copy is still intact."""
    w = workload(mib=16, per_tick=2)
    srv = Server(hosts, tmp_path / "dst")
    try:
        p = subprocess.run(hosts.run(hosts.src, sys.executable, "-c", LOST_TRACKING, w.pid, hosts.dst_ip, PORT),
                           capture_output=True, text=True, timeout=600)
        srv.finish()
    finally:
        srv.kill()
    assert p.returncode == 0, p.stderr
    new = restored_pid(p.stdout)
    try:
        head = p.stdout.splitlines()[0]
        fetched, lazy_pages = (int(x) for x in head.split("lazy pages: ")[1].split(" read")[0].split(" of "))
        assert fetched == lazy_pages >= 4096 and "0 in the parent" in head and "not tracked" in head, head
        w.proc.wait(timeout=30)
        w.runs_on(new)
        [mig] = srv.visible()
        assert not os.path.lexists(tmp_path / "dst" / mig / "3" / "parent")
    finally:
        os.kill(new, signal.SIGKILL)


CORRUPT_CHAIN = """
import glob, os, sys
from wpdump.dump.convergence import PHaulPolicy
from wpdump.migrate.source import migrate

class CorruptThenStop(PHaulPolicy):
    def stop_reason(self, history):
        if len(history) < 2:
            return None
        for it in history:  # the local chain no longer holds the memory (it was sent intact already)
            for f in glob.glob(os.path.join(it.images_dir, "pages-*.img")):
                with open(f, "r+b") as fh:
                    fh.write(b"\\xa5" * os.path.getsize(f))
        return "the test stops here"

print(migrate(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), CorruptThenStop(), out=lambda line: None).hook)
"""


def test_lazy_final_dump_checks_the_chain_against_the_frozen_tree(hosts, workload, tmp_path):
    """The chain on the source does not hold what the tree holds: the sample comparison catches it and every page
    is read from the frozen tree."""
    w = workload(mib=16, per_tick=2)
    srv = Server(hosts, tmp_path / "dst")
    try:
        p = subprocess.run(hosts.run(hosts.src, sys.executable, "-c", CORRUPT_CHAIN, w.pid, hosts.dst_ip, PORT),
                           capture_output=True, text=True, timeout=600)
        _, out, _ = srv.finish()
    finally:
        srv.kill()
    assert p.returncode == 0, p.stderr
    new = int(out.split("restored pid ")[1].split()[0])
    try:
        head = p.stdout.splitlines()[0]
        fetched, lazy_pages = (int(x) for x in head.split("lazy pages: ")[1].split(" read")[0].split(" of "))
        assert fetched == lazy_pages >= 4096 and "differs from the frozen tree" in head, head
        w.proc.wait(timeout=30)
        w.runs_on(new)
    finally:
        os.kill(new, signal.SIGKILL)


def test_migrate_killed_after_the_final_dump_leaves_the_source_running(hosts, workload, tmp_path):
    """SIGKILL of wpdump migrate while CRIU has left the source tree stopped (the final dump is on its way and
    the destination stalls): its guard resumes the tree."""
    w = workload(mib=16, per_tick=2)
    srv = Server(hosts, tmp_path / "dst")
    src = subprocess.Popen(hosts.run(hosts.src, WPDUMP, "migrate", "-t", w.pid, "--address", hosts.dst_ip, "--port",
                                     PORT, "--max-iterations", 1), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not list(srv.dest.glob(".incoming-*/.2.partial-*")):  # the final iteration's header has come
            assert time.time() < deadline and src.poll() is None
            time.sleep(0.005)
        srv.proc.send_signal(signal.SIGSTOP)
        with open(f"/proc/{w.pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] == "T"  # CRIU left it stopped
        src.kill()  # nsenter execs wpdump: this is the migrate process itself
        src.wait(timeout=60)
        w.runs_on(w.pid)  # resumed by the guard, memory intact
    finally:
        srv.kill()
        if src.poll() is None:
            src.kill()
