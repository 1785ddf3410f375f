"""``criu swrk FD``: CRIU's RPC over the SOCK_SEQPACKET socket a runtime (runc, crun, go-criu) passes.

The first request decides. A request wpdump-criu does not handle (VERSION, RESTORE, CHECK, a DUMP without a
parent, a page server ...) execs the real CRIU on the same fd: it reads that request itself (we only peeked
at it), with the runtime's fds, pid, cgroup and parent intact. Otherwise this process serves the session:

- FEATURE_CHECK: the real CRIU's answer, with ``mem_track`` true where the kernel can track with userfaultfd;
- PRE_DUMP: wpdump's pre-dump into the images directory (``parent_img`` honoured), CRIU's response;
- DUMP with ``track_mem`` and ``parent_img``: the real CRIU dumps without either (it cannot track: no
  soft-dirty), over a socket pair we hold, with ``notify_scripts`` forced on; at its ``pre-dump`` and
  ``post-dump`` notifications wpdump's criu hook runs (post-dump rewrites the pagemaps against the chain);
  the runtime sees exactly the notifications it asked for and answers them itself.

CRIU resolves fd numbers in a request (``images_dir_fd``, ``work_dir_fd``, ``status_fd``) in its peer's
fd table (/proc/PEER/fd/N, PEER from SO_PEERCRED): requests relayed to a real CRIU carry ours instead.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import struct
import subprocess
import time

from ..criu_pb import rpc_pb2
from ..errors import WpdumpError
from .criulog import Log

MAX_MSG = 1 << 20  # CRIU's requests and responses are a few KiB
MAX_FDS = 16
T = rpc_pb2  # criu_req_type values: T.DUMP, T.PRE_DUMP ...


class Conn:
    """One end of a SOCK_SEQPACKET pair: whole messages, with the fds they carry (SCM_RIGHTS)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def peek(self) -> bytes:
        """The next message without consuming it (no fds: peeking would install copies of them)."""
        return self.sock.recv(MAX_MSG, socket.MSG_PEEK)

    def recv(self) -> tuple[bytes, list[int]]:
        """The next message and its fds; b"" at EOF."""
        data, anc, flags, _ = self.sock.recvmsg(MAX_MSG, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
        fds: list[int] = []
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(payload[: len(payload) - len(payload) % a.itemsize])
                fds.extend(a)
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            for fd in fds:
                os.close(fd)
            raise OSError(errno.EMSGSIZE, "an RPC message was truncated")
        return data, fds

    def send(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        self.sock.sendmsg([data], anc)

    def peer_pid(self) -> int:
        cred = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", cred)[0]


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def parse_req(data: bytes) -> rpc_pb2.criu_req:
    req = rpc_pb2.criu_req()
    req.ParseFromString(data)
    return req


def parse_resp(data: bytes) -> rpc_pb2.criu_resp:
    resp = rpc_pb2.criu_resp()
    resp.ParseFromString(data)
    return resp


def wants_chain(req: rpc_pb2.criu_req) -> bool:
    """A DUMP that CRIU would make incremental with soft-dirty: wpdump's hook makes it so instead."""
    o = req.opts
    return (req.type == T.DUMP and o.track_mem and bool(o.parent_img) and not o.lazy_pages
            and not o.HasField("ps") and not o.HasField("pidfd_store_sk"))


def handles_first(req: rpc_pb2.criu_req) -> bool:
    """Whether this process serves a session opened by ``req`` (else the real CRIU does, exec'd)."""
    return req.type in (T.FEATURE_CHECK, T.PRE_DUMP, T.SINGLE_PRE_DUMP) or wants_chain(req)


def failure(kind: int, message: str, err: int | None) -> rpc_pb2.criu_resp:
    """A failure response as CRIU sends one: cr_errno and the first error line of the log."""
    resp = rpc_pb2.criu_resp(type=kind, success=False, cr_errmsg=message)
    if err:
        resp.cr_errno = err
    return resp


class RealCriu:
    """A real ``criu swrk`` child on a socket pair we hold, fed requests with fds translated to ours."""

    def __init__(self, path: str, runtime_peer: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen([path, "swrk", str(theirs.fileno())], pass_fds=[theirs.fileno()])
        theirs.close()
        self.conn = Conn(ours)
        self.peer = runtime_peer
        self.fds: list[int] = []  # our copies of the runtime's fds the request names

    def _own(self, fd: int, flags: int) -> int:
        mine = os.open(f"/proc/{self.peer}/fd/{fd}", flags | os.O_CLOEXEC)
        self.fds.append(mine)
        return mine

    def translate(self, req: rpc_pb2.criu_req) -> rpc_pb2.criu_req:
        """``req`` with the runtime's fd numbers replaced by our copies (CRIU opens /proc/OURPID/fd/N)."""
        req = rpc_pb2.criu_req.FromString(req.SerializeToString())
        if not req.HasField("opts"):
            return req
        o = req.opts
        if o.HasField("pidfd_store_sk") or o.HasField("ps") and o.ps.HasField("fd") or len(o.inherit_fd):
            raise WpdumpError("wpdump-criu cannot relay sockets or inherited fds to CRIU mid-session",
                              errno=errno.EOPNOTSUPP)
        if o.images_dir_fd >= 0:
            o.images_dir_fd = self._own(o.images_dir_fd, os.O_RDONLY | os.O_DIRECTORY)
        if o.HasField("work_dir_fd"):
            o.work_dir_fd = self._own(o.work_dir_fd, os.O_RDONLY | os.O_DIRECTORY)
        if o.HasField("status_fd"):
            o.status_fd = self._own(o.status_fd, os.O_WRONLY)
        if not o.HasField("pid") and req.type in (T.DUMP, T.PRE_DUMP, T.SINGLE_PRE_DUMP):
            o.pid = self.peer  # CRIU's default: the process that asked
        return req

    def close(self) -> int:
        """Close our end, reap CRIU; its exit status."""
        self.conn.sock.close()
        _close(self.fds)
        self.fds = []
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def _take_parent_link(images: str) -> str | None:
    """Remove a ``parent`` link the runtime made itself (podman does, before CRIU runs): the hook links the
    final dump to the chain only if none is there. Its target, or None."""
    link = os.path.join(images, "parent")
    try:
        target = os.readlink(link)
    except OSError:
        return None
    os.unlink(link)
    return target


def _give_back_parent_link(images: str, target: str) -> None:
    """The runtime's link again, unless the hook linked the dump to the chain (CRIU's images left full
    never read their parent: the link is harmless)."""
    try:
        os.symlink(target, os.path.join(images, "parent"))
    except FileExistsError:
        pass


class Session:
    """A swrk session this process serves (the first request needed it)."""

    def __init__(self, conn: Conn, real: str) -> None:
        self.rt = conn
        self.peer = conn.peer_pid()
        self.real = real

    # ---- paths from the runtime's fds ----

    def _path_of(self, fd: int) -> str:
        """The path of the runtime's fd ``fd`` (CRIU opens /proc/PEER/fd/N; we need the name, for the engine)."""
        return os.readlink(f"/proc/{self.peer}/fd/{fd}")

    def _dirs(self, o: rpc_pb2.criu_opts) -> tuple[str, str]:
        if o.images_dir_fd >= 0:
            images = self._path_of(o.images_dir_fd)
        elif o.images_dir:
            images = o.images_dir
        else:
            raise WpdumpError("Neither images_dir_fd nor images_dir was passed by RPC client", errno=errno.EINVAL)
        work = self._path_of(o.work_dir_fd) if o.HasField("work_dir_fd") else images
        return images, work

    # ---- the session ----

    def run(self) -> int:
        """Serve requests until the runtime closes the socket; CRIU's exit status convention (0 = success)."""
        status = 0
        while True:
            data, fds = self.rt.recv()
            _close(fds)
            if not data:
                return status
            req = parse_req(data)
            if req.type == T.FEATURE_CHECK:
                resp = self.feature_check(req)
            elif req.type in (T.PRE_DUMP, T.SINGLE_PRE_DUMP):
                resp = self.pre_dump(req)
            else:
                resp = self.relay(req)
            if resp is None:  # the runtime went away mid-request
                return 1
            self.rt.send(resp.SerializeToString())
            status = 0 if resp.success else 1
            # CRIU's pre-dump loop waits for the next PRE_DUMP or the DUMP (runc closes the socket instead)
            if not resp.success or not (req.type == T.PRE_DUMP or req.keep_open):
                return status

    def feature_check(self, req: rpc_pb2.criu_req) -> rpc_pb2.criu_resp | None:
        resp = self.relay(req)
        if resp is not None and resp.success and req.features.mem_track:
            from ..target import uffd

            try:
                resp.features.mem_track = not uffd.missing_features()
            except OSError:  # no userfaultfd at all
                resp.features.mem_track = False
        return resp

    def pre_dump(self, req: rpc_pb2.criu_req) -> rpc_pb2.criu_resp:
        """wpdump's pre-dump of the tree into the images directory; CRIU's response and log conventions."""
        from .predump import run_pre_dump

        o = req.opts
        kind = req.type
        log = Log()
        try:
            images, work = self._dirs(o)
        except (WpdumpError, OSError) as e:
            return failure(kind, log.error(str(e)), getattr(e, "errno", None) or errno.EINVAL)
        log.path = os.path.join(work, o.log_file or "criu.log")
        if o.HasField("ps"):
            msg = log.error("pre-dump to a page server is not supported by wpdump-criu")
            log.flush()
            return failure(kind, msg, errno.EOPNOTSUPP)
        pid = o.pid if o.HasField("pid") else self.peer
        err = run_pre_dump(pid, images, o.parent_img or None, log)
        log.flush()
        if err is not None:
            return failure(kind, err[0], err[1])
        return rpc_pb2.criu_resp(type=kind, success=True)

    def relay(self, req: rpc_pb2.criu_req) -> rpc_pb2.criu_resp | None:
        """``req`` served by a real CRIU child; a DUMP onto a wpdump chain goes with the hook."""
        from ..dump import criu_hook

        chain = wants_chain(req)
        runtime_link: str | None = None
        asked = req.HasField("opts") and req.opts.notify_scripts
        hook_log = None
        try:
            real = RealCriu(self.real, self.peer)
        except OSError as e:
            return failure(req.type, f"wpdump-criu: cannot run {self.real}: {e.strerror}", e.errno)
        try:
            env: dict[str, str] = {}
            try:
                sent = real.translate(req)
                if chain:
                    o = sent.opts
                    o.track_mem = False  # no soft-dirty here: wpdump's hook makes the dump incremental
                    o.ClearField("parent_img")
                    o.notify_scripts = True
                    images, work = self._dirs(req.opts)
                    env = {"CRTOOLS_IMAGE_DIR": images, "CRTOOLS_INIT_PID": str(o.pid)}
                    hook_log = Log(os.path.join(work, "wpdump-criu.log"))
                    runtime_link = _take_parent_link(images)
            except (WpdumpError, OSError) as e:
                return failure(req.type, f"wpdump-criu: {e}", getattr(e, "errno", None) or errno.EINVAL)
            real.conn.send(sent.SerializeToString())
            while True:
                data, fds = real.conn.recv()
                if not data:
                    status = real.close()
                    return failure(req.type, f"wpdump-criu: CRIU ({self.real}) exited without an answer "
                                   f"(status {status})", errno.ECONNRESET)
                resp = parse_resp(data)
                if resp.type != T.NOTIFY:
                    _close(fds)
                    return resp
                script = resp.notify.script
                if chain and script in ("pre-dump", "post-dump"):
                    assert hook_log is not None
                    t0 = time.perf_counter()
                    criu_hook.run_hook({**env, "CRTOOLS_SCRIPT_ACTION": script}, hook_log)
                    hook_log.info(f"{script} hook took {(time.perf_counter() - t0) * 1e3:.1f} ms")
                    hook_log.flush()
                if asked:
                    self.rt.send(data, fds)
                    _close(fds)
                    reply, rfds = self.rt.recv()
                    if not reply:
                        return None
                    real.conn.send(reply, rfds)
                    _close(rfds)
                else:
                    _close(fds)
                    real.conn.send(rpc_pb2.criu_req(type=T.NOTIFY, notify_success=True).SerializeToString())
        finally:
            if hook_log is not None:
                hook_log.flush()
            if runtime_link is not None:
                _give_back_parent_link(images, runtime_link)
            real.close()


def serve(fd: int, real: str) -> int:
    """``criu swrk FD``: exec the real CRIU for a session we do not handle, else serve it."""
    sock = socket.socket(fileno=fd)
    conn = Conn(sock)
    try:
        first = conn.peek()
    except OSError as e:
        raise WpdumpError(f"swrk {fd}: cannot read a request: {e.strerror}", errno=e.errno) from None
    if first and not handles_first(parse_req(first)):
        sock.detach()  # the fd stays open (and inheritable) for the real CRIU
        os.execv(real, [real, "swrk", str(fd)])
    try:
        return Session(conn, real).run()
    finally:
        sock.close()
