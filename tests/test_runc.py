"""wpdump-criu as runc's CRIU (`runc --criu .venv/bin/wpdump-criu`): pre-checkpoints of a real container.

The container is built offline: a rootfs with Debian's static busybox and tests/targets/selfcheck.c linked
statically (it keeps writing its memory and checks it against its own checksums on SIGUSR1, writing the
verdict to /tmp/result in the rootfs).
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from chaincheck import PE_PARENT, PE_PRESENT
from conftest import TARGETS, ResultLines, require_kernel
from test_criu import decode_all
from wpdump.criu_pb import rpc_pb2
from wpdump.images import format as images

BIN = pathlib.Path(sys.executable).parent
WRAP, CRIU, CRIT, CRIU4_CRIT = BIN / "wpdump-criu", BIN / "criu", BIN / "crit", BIN / "criu4-crit"
PAGE = 4096
MIB = 16
_ids = itertools.count()


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is missing: tools/setup installs it")
    return path


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory) -> pathlib.Path:
    """A container root: /bin/busybox (static, Debian's busybox-static) and /selfcheck (gcc -static)."""
    _need("runc")
    if not CRIU.exists() or not WRAP.exists():
        pytest.fail(f"{CRIU} / {WRAP} missing: run tools/setup")
    root = tmp_path_factory.mktemp("rootfs")
    (root / "bin").mkdir()
    (root / "tmp").mkdir()
    busybox = "/bin/busybox"
    out = subprocess.run(["file", "-L", busybox], capture_output=True, text=True).stdout
    if "statically linked" not in out:
        pytest.fail(f"{busybox} is not static ({out.strip()}): tools/setup installs busybox-static")
    shutil.copy2(busybox, root / "bin" / "busybox")
    os.symlink("busybox", root / "bin" / "sh")
    subprocess.run(["gcc", "-static", "-O1", "-Wall", "-o", str(root / "selfcheck"), str(TARGETS / "selfcheck.c")],
                   check=True)
    return root


class Container(ResultLines):
    """A runc container running selfcheck; runc's state under the test's own --root."""

    def __init__(self, tmp: pathlib.Path, rootfs: pathlib.Path, netns: bool, mib: int = MIB,
                 args: list[str] | None = None) -> None:
        self.id = f"wpdump-test-{os.getpid()}-{next(_ids)}"
        self.tmp = tmp
        self.state = tmp / "runc-root"
        self.bundle = tmp / "bundle"
        shutil.copytree(rootfs, self.bundle / "rootfs", symlinks=True)
        subprocess.run(["runc", "spec"], cwd=self.bundle, check=True)
        cfg = json.loads((self.bundle / "config.json").read_text())
        cfg["process"]["terminal"] = False
        cfg["process"]["args"] = args or ["/selfcheck", str(mib), "/tmp/result", "4"]
        cfg["root"]["readonly"] = False
        if not netns:
            nss = cfg["linux"]["namespaces"]
            cfg["linux"]["namespaces"] = [n for n in nss if n["type"] != "network"]
        (self.bundle / "config.json").write_text(json.dumps(cfg, indent=1))
        self.result = self.bundle / "rootfs" / "tmp" / "result"
        self.started = False

    def runc(self, *args: object, criu: pathlib.Path = WRAP, check: bool = True) -> subprocess.CompletedProcess:
        """runc with our --root and --criu; the detached container inherits nothing of ours (/dev/null):
        runc's own errors go to its --log."""
        log = self.tmp / "runc.log"
        cmd = ["runc", "--root", str(self.state), "--log", str(log), "--criu", str(criu), *map(str, args)]
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=300, cwd=self.tmp)
        if check:
            tail = log.read_text()[-3000:] if log.exists() else ""
            assert p.returncode == 0, f"{' '.join(cmd)}: exit {p.returncode}\n{tail}"
        return p

    def start(self) -> None:
        self.runc("run", "-d", "--bundle", self.bundle, self.id)
        self.started = True
        self.wait_line("ready")

    def state_of(self) -> dict:
        p = subprocess.run(["runc", "--root", str(self.state), "state", self.id], capture_output=True, text=True)
        return json.loads(p.stdout) if p.returncode == 0 else {}



    def signal(self, sig: str, prefix: str) -> str:
        n = len(self.lines())
        self.runc("kill", self.id, sig)
        return self.wait_line(prefix, after=n)

    def self_check(self) -> str:
        line = self.signal("USR1", "ok")
        assert line.startswith("ok"), line
        return line

    def destroy(self) -> None:
        if self.started:
            subprocess.run(["runc", "--root", str(self.state), "delete", "-f", self.id], capture_output=True,
                           timeout=60)


@pytest.fixture
def container(rootfs, tmp_path):
    made: list[Container] = []

    def make(netns: bool = False, mib: int = MIB, args: list[str] | None = None) -> Container:
        made.append(Container(tmp_path, rootfs, netns, mib, args))
        return made[-1]

    yield make
    for c in made:
        c.destroy()


def stats(d: pathlib.Path) -> dict:
    return images.decode_stats((d / images.STATS_FILE).read_bytes(), str(d / images.STATS_FILE))


def pagemap_pages(d: pathlib.Path, flag: int) -> int:
    """Pages with ``flag`` over every pagemap of an images directory."""
    n = 0
    for f in d.glob("pagemap-*.img"):
        _, entries = images.decode_pagemap(f.read_bytes(), str(f))
        n += int(entries["nr_pages"][(entries["flags"] & flag) != 0].sum())
    return n


def pages_bytes(d: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in d.glob("pages-*.img"))


@pytest.mark.parametrize("netns", [False, True], ids=["host-net", "own-netns"])
def test_runc_pre_dumps_checkpoint_and_restore(container, tmp_path, netns):
    """Two pre-dumps, the final checkpoint onto them, a restore: the restored container passes its self-check."""
    require_kernel()
    if netns:
        _need("iptables-restore")  # CRIU's network lock of the container's namespace
    c = container(netns=netns)
    c.start()
    c.runc("checkpoint", "--pre-dump", "--image-path", tmp_path / "p1", c.id)
    assert c.state_of().get("status") == "running"
    s1 = stats(tmp_path / "p1")
    assert s1["pages_written"] >= MIB * 256 and s1["pages_skipped_parent"] == 0, s1
    assert "pre-dump of pid" in (tmp_path / "p1" / "dump.log").read_text()

    c.signal("USR2", "paused")  # no writes of the big map from here: p2 to final is exactly counted
    c.runc("checkpoint", "--pre-dump", "--parent-path", "../p1", "--image-path", tmp_path / "p2", c.id)
    assert os.readlink(tmp_path / "p2" / "parent") == "../p1"
    s2 = stats(tmp_path / "p2")
    assert s2["pages_skipped_parent"] >= MIB * 256 // 2 and s2["pages_written"] < s1["pages_written"], s2
    for d in ("p1", "p2"):
        assert decode_all(tmp_path / d, [CRIT, CRIU4_CRIT]) >= 3

    c.signal("USR2", "running")
    c.self_check()  # touches every page of the map, writes a few pages of its own
    paused = c.signal("USR2", "paused")
    written_since_p2 = 4 * (int(paused.split()[1]) + 1)  # 4 pages a tick, at most one tick after the pause
    c.runc("checkpoint", "--parent-path", "../p2", "--image-path", tmp_path / "final", c.id)
    assert c.state_of().get("status") in (None, "stopped"), c.state_of()
    final = tmp_path / "final"
    final_present, final_parent, final_bytes = pagemap_pages(final, PE_PRESENT), pagemap_pages(final, PE_PARENT), \
        pages_bytes(final)

    c.runc("restore", "-d", "--image-path", final, "--bundle", c.bundle, c.id)
    assert c.state_of().get("status") == "running"
    c.signal("USR2", "running")
    first = c.self_check()
    second = c.self_check()
    assert int(second.split()[1]) > int(first.split()[1]) or second == first, (first, second)

    # the final checkpoint holds what was written since p2 (plus the process's own small writes), the rest
    # comes from the chain: needs CRIU's pagemap names (pid in the container's namespace) on the wpdump side
    hooklog = (final / "wpdump-criu.log").read_text()
    assert os.path.lexists(final / "parent"), f"the final checkpoint is not incremental:\n{hooklog}"
    assert final_parent >= MIB * 256 - 512, (final_present, final_parent, hooklog)
    assert final_bytes == final_present * PAGE < (written_since_p2 + 512) * PAGE, (final_bytes, written_since_p2)


def test_runc_tree_container(container, tmp_path):
    """A container of three processes (sh, two selfchecks): every process pre-dumped, the final checkpoint
    rewritten for each against the chain, both workloads pass their self-checks after the restore."""
    require_kernel()
    c = container(args=["/bin/sh", "-c", "/selfcheck 16 /tmp/result 4 & /selfcheck 8 /tmp/r2 4 & wait"])
    c.start()
    r2 = c.bundle / "rootfs" / "tmp" / "r2"
    deadline = time.time() + 30
    while not (r2.exists() and "ready" in r2.read_text()) and time.time() < deadline:
        time.sleep(0.01)
    c.runc("checkpoint", "--pre-dump", "--image-path", tmp_path / "p1", c.id)
    assert len(list((tmp_path / "p1").glob("pagemap-*.img"))) == 3
    assert decode_all(tmp_path / "p1", [CRIT, CRIU4_CRIT]) >= 5
    c.runc("checkpoint", "--pre-dump", "--parent-path", "../p1", "--image-path", tmp_path / "p2", c.id)
    c.runc("checkpoint", "--parent-path", "../p2", "--image-path", tmp_path / "final", c.id)
    final = tmp_path / "final"
    in_parent = pagemap_pages(final, PE_PARENT)
    hooklog = (final / "wpdump-criu.log").read_text()
    c.runc("restore", "-d", "--image-path", final, "--bundle", c.bundle, c.id)
    n1, n2 = len(c.lines()), len(r2.read_text().splitlines())
    c.runc("exec", c.id, "/bin/sh", "-c", "kill -USR1 $(pidof selfcheck)")
    assert c.wait_line("ok", after=n1).startswith("ok")
    deadline = time.time() + 30
    while len(r2.read_text().splitlines()) <= n2 and time.time() < deadline:
        time.sleep(0.01)
    assert r2.read_text().splitlines()[n2].startswith("ok"), r2.read_text()
    assert hooklog.count("now in the parent") == 3, hooklog
    assert in_parent >= (16 + 8) * 256 - 1024, hooklog


def test_runc_plain_checkpoint_and_restore_go_to_the_real_criu(container, tmp_path):
    """A DUMP without a parent and a RESTORE are the real CRIU's (wpdump-criu execs it on runc's socket)."""
    c = container()
    c.start()
    c.runc("checkpoint", "--image-path", tmp_path / "full", c.id)
    log = (tmp_path / "full" / "dump.log").read_text()
    assert "Dumping finished successfully" in log and "wpdump-criu" not in log
    assert pagemap_pages(tmp_path / "full", PE_PRESENT) >= MIB * 256
    c.runc("restore", "-d", "--image-path", tmp_path / "full", "--bundle", c.bundle, c.id)
    assert "Restore finished successfully" in (tmp_path / "full" / "restore.log").read_text()
    c.self_check()


def test_runc_pre_dump_fails_without_wpdump_criu(container, tmp_path):
    """The reason for wpdump-criu: on this kernel the real CRIU refuses runc's pre-dump at its feature check."""
    c = container()
    c.start()
    p = c.runc("checkpoint", "--pre-dump", "--image-path", tmp_path / "p1", c.id, criu=CRIU, check=False)
    assert p.returncode != 0
    assert "missing features" in (tmp_path / "runc.log").read_text()


def test_runc_pre_dump_onto_a_bogus_parent_fails(container, tmp_path):
    """runc must not take a failed pre-dump for a good one: its parent is no wpdump iteration."""
    c = container()
    c.start()
    (tmp_path / "bogus").mkdir()
    p = c.runc("checkpoint", "--pre-dump", "--parent-path", "../bogus", "--image-path", tmp_path / "p1", c.id,
               check=False)
    assert p.returncode != 0
    assert "criu failed" in (tmp_path / "runc.log").read_text()
    assert "Error (wpdump-criu): pre-dump of pid" in (tmp_path / "p1" / "dump.log").read_text()
    assert not list((tmp_path / "p1").glob("*.img"))
    c.self_check()  # the container runs on unharmed


# ---- the RPC, spoken directly ----


def swrk(binary: pathlib.Path, req: rpc_pb2.criu_req, pass_fds: tuple[int, ...] = ()) -> tuple[rpc_pb2.criu_resp, int]:
    """One request to ``binary swrk FD``, as runc sends it; the response and the exit status."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        p = subprocess.Popen([str(binary), "swrk", str(theirs.fileno())], pass_fds=(theirs.fileno(), *pass_fds),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        theirs.close()
        ours.send(req.SerializeToString())
        data = ours.recv(1 << 20)
        ours.shutdown(socket.SHUT_WR)
    resp = rpc_pb2.criu_resp()
    resp.ParseFromString(data)
    return resp, p.wait(timeout=120)


def test_rpc_check_gets_the_real_criu_answer(tmp_path):
    req = rpc_pb2.criu_req(type=rpc_pb2.CHECK)
    theirs, _ = swrk(CRIU, req)
    ours, _ = swrk(WRAP, req)
    assert ours.type == theirs.type == rpc_pb2.CHECK
    assert (ours.success, ours.cr_errno) == (theirs.success, theirs.cr_errno)


def test_rpc_version_and_feature_check(tmp_path):
    require_kernel()
    v_real, _ = swrk(CRIU, rpc_pb2.criu_req(type=rpc_pb2.VERSION))
    v_ours, _ = swrk(WRAP, rpc_pb2.criu_req(type=rpc_pb2.VERSION))
    assert v_ours == v_real and v_real.version.major_number >= 4
    req = rpc_pb2.criu_req(type=rpc_pb2.FEATURE_CHECK,
                           features=rpc_pb2.criu_features(mem_track=True, lazy_pages=True))
    real, _ = swrk(CRIU, req)
    ours, _ = swrk(WRAP, req)
    assert real.success and not real.features.mem_track  # no soft-dirty on this kernel
    assert ours.success and ours.features.mem_track
    assert ours.features.lazy_pages == real.features.lazy_pages  # the real CRIU's answer for the rest


def test_rpc_failed_pre_dump_is_reported_as_failed(tmp_path):
    """A pre-dump that cannot be done is never a success: CRIU's failure response and an error in the log."""
    d = tmp_path / "img"
    d.mkdir()
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        pid = subprocess.Popen(["true"])
        pid.wait()  # a pid that no longer exists
        req = rpc_pb2.criu_req(type=rpc_pb2.PRE_DUMP, opts=rpc_pb2.criu_opts(
            images_dir_fd=fd, pid=pid.pid, track_mem=True, log_file="pre.log"))
        resp, status = swrk(WRAP, req, pass_fds=(fd,))
    finally:
        os.close(fd)
    assert resp.type == rpc_pb2.PRE_DUMP and not resp.success and resp.cr_errno, resp
    assert str(pid.pid) in resp.cr_errmsg
    assert "Error (wpdump-criu)" in (d / "pre.log").read_text()
    assert status != 0 and not list(d.glob("*.img"))


def test_cli_check_feature_mem_dirty_track():
    require_kernel()
    real = subprocess.run([str(CRIU), "check", "--feature", "mem_dirty_track"], capture_output=True, text=True)
    ours = subprocess.run([str(WRAP), "check", "--feature", "mem_dirty_track"], capture_output=True, text=True)
    assert real.returncode != 0 and ours.returncode == 0, (real, ours)
    v = subprocess.run([str(WRAP), "--version"], capture_output=True, text=True)
    assert v.stdout == subprocess.run([str(CRIU), "--version"], capture_output=True, text=True).stdout


def test_wrapper_refuses_to_wrap_itself():
    p = subprocess.run([str(WRAP), "--version"], env={**os.environ, "WPDUMP_REAL_CRIU": str(WRAP)},
                       capture_output=True, text=True)
    assert p.returncode == 1 and "wpdump-criu itself" in p.stderr


def test_cli_pre_dumps_dump_and_restore(rootfs, tmp_path):
    """The command line as LXC drives it: pre-dump --track-mem, pre-dump --prev-images-dir, dump --track-mem
    --prev-images-dir (CRIU's dump with the hook), criu restore."""
    require_kernel()
    result = tmp_path / "result"
    proc = subprocess.Popen([str(rootfs / "selfcheck"), str(MIB), str(result), "4"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 30
        while "ready" not in (result.read_text() if result.exists() else "") and time.time() < deadline:
            time.sleep(0.01)
        for d in ("1", "2", "final"):
            (tmp_path / d).mkdir()

        bindir = tmp_path / "bin"  # as LXC finds it: `criu` in PATH, a link to wpdump-criu
        bindir.mkdir()
        os.symlink(WRAP, bindir / "criu")
        env = {**os.environ, "PATH": f"{bindir}:/usr/sbin:/usr/bin:/sbin:/bin"}

        def wrap(*args: object) -> None:
            p = subprocess.run(["criu", *map(str, args)], capture_output=True, text=True, timeout=300, env=env)
            assert p.returncode == 0, (args, p.stderr)

        wrap("pre-dump", "-t", proc.pid, "-D", tmp_path / "1", "--track-mem", "-o", "pre.log", "-v4")
        wrap("pre-dump", "-t", proc.pid, "-D", tmp_path / "2", "--track-mem", "--prev-images-dir", "../1",
             "-o", "pre.log")
        assert stats(tmp_path / "2")["pages_skipped_parent"] > 0
        wrap("dump", "-t", proc.pid, "-D", tmp_path / "final", "--track-mem", "--prev-images-dir", "../2",
             "-o", "dump.log", "-v4")
        log = (tmp_path / "final" / "dump.log").read_text()
        assert "wpdump criu-hook" in log and "now in the parent" in log, log[-3000:]
        assert os.readlink(tmp_path / "final" / "parent") == "../2"
        proc.wait(timeout=60)
        p = subprocess.run([str(WRAP), "restore", "-D", tmp_path / "final", "-d", "-o", "restore.log"],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        n = len(result.read_text().splitlines())
        os.kill(proc.pid, signal.SIGUSR1)
        deadline = time.time() + 30
        while time.time() < deadline and len(result.read_text().splitlines()) <= n:
            time.sleep(0.01)
        assert result.read_text().splitlines()[n].startswith("ok"), result.read_text()
    finally:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if proc.poll() is None:
            proc.wait()


# ---- podman (finds `criu` through PATH) ----


@pytest.fixture(scope="module")
def podman_image(rootfs, tmp_path_factory):
    """The rootfs as a podman image (`podman import`, offline); removed at the end."""
    _need("podman")
    tar = tmp_path_factory.mktemp("podman") / "rootfs.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], check=True)
    name = f"localhost/wpdump-selfcheck:test-{os.getpid()}"
    subprocess.run(["podman", "import", str(tar), name], check=True, capture_output=True, timeout=300)
    yield name
    subprocess.run(["podman", "rmi", "-f", name], capture_output=True, timeout=300)


def test_podman_pre_checkpoint_with_previous_and_restore(podman_image, tmp_path):
    """podman container checkpoint --pre-checkpoint, then --with-previous, then restore, with wpdump-criu
    first in PATH as `criu`. podman 4.3's default rlimits fail here (docs/kernel.md): lowered."""
    require_kernel()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink(WRAP, bindir / "criu")
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    name = f"wpdump-test-{os.getpid()}"

    def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=300,
                           stdin=subprocess.DEVNULL)
        assert not check or p.returncode == 0, f"podman {' '.join(args)}: {p.returncode}\n{p.stderr}"
        return p

    def result() -> list[str]:
        p = podman("exec", name, "/bin/busybox", "cat", "/tmp/result", check=False)
        assert p.returncode == 0 or "No such file" in p.stderr, p.stderr  # not written before "ready"
        return p.stdout.splitlines()

    def self_check() -> str:
        n = len(result())
        podman("kill", "-s", "USR1", name)
        deadline = time.time() + 30
        while time.time() < deadline:
            new = result()[n:]
            if new:
                return new[0]
            time.sleep(0.05)
        raise AssertionError(f"no self-check answer: {result()}")

    try:
        podman("run", "-d", "--name", name, "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
               podman_image, "/selfcheck", str(MIB), "/tmp/result", "4")
        deadline = time.time() + 30
        while "ready" not in result() and time.time() < deadline:
            time.sleep(0.05)
        assert "ready" in result()
        podman("container", "checkpoint", "--pre-checkpoint", name)
        static = pathlib.Path(podman("inspect", name, "--format", "{{.StaticDir}}").stdout.strip())
        pre = static / "pre-checkpoint"
        assert stats(pre)["pages_written"] >= MIB * 256
        assert decode_all(pre, [CRIT, CRIU4_CRIT]) >= 3
        podman("container", "checkpoint", "--with-previous", name)
        hooklog = (static / "wpdump-criu.log").read_text()  # the DUMP onto the chain went through the hook
        final = static / "checkpoint"
        in_parent = pagemap_pages(final, PE_PARENT)
        podman("container", "restore", name)
        assert self_check().startswith("ok")
        # podman links checkpoint/parent itself: the hook still rewrites the final dump against the chain
        assert in_parent >= MIB * 256 - 1024, hooklog
    finally:
        podman("rm", "-f", name, check=False)
