"""Image directories: written atomically (a private temporary directory beside the destination, files created
0600 without following symlinks, fsynced, renamed into place only when complete), and the walk down their
``parent`` links."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, wait

from ..errors import ChainError, WpdumpError
from ..target.process import exists
from ..workers import Workers

_STAGING_PARENTS: set[str] = set()  # where this process may have created staging directories
MAX_DEPTH = 4096  # parent links followed at most
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_UNSYNCED = 64  # files held open for the fsync at commit, at most
_syncer = Workers(4, "wpdump-fsync")


def _fsync_all(fds: list[tuple[int, str]]) -> None:
    """fsync every (fd, path) at once, from threads: concurrent fsyncs overlap (a journal commits them together;
    4 small files: 0.5-0.6 ms at once against 3-8 ms one after the other here). Raises the first error."""
    if len(fds) <= 1:
        for fd, path in fds:
            fsync(fd, path)
        return
    futs = [_syncer.submit(fsync, fd, path) for fd, path in fds[1:]]
    try:
        fsync(*fds[0])
    finally:
        for f in futs:
            f.exception()  # wait for all before any fd may be closed
    for f in futs:
        f.result()


class ImageDirError(WpdumpError):
    """An images directory cannot be used or written (exists and not empty, disk full, permission)."""


def describe_os_error(e: OSError, what: str) -> ImageDirError:
    """One line for an OSError met while writing ``what``."""
    if e.errno == errno.ENOSPC:
        text = f"disk full while writing {what}"
    elif e.errno == errno.EDQUOT:
        text = f"disk quota exceeded while writing {what}"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        text = f"cannot write {what}: {e.strerror}"
    else:
        text = f"cannot write {what}: {e.strerror or e}"
    return ImageDirError(text, errno=e.errno)


def check_destination(dest: str) -> str:
    """Absolute path of ``dest``; it may not exist yet or be an empty directory (not a symlink)."""
    dest = os.path.abspath(dest)
    parent = os.path.dirname(dest)
    try:
        if not stat.S_ISDIR(os.stat(parent).st_mode):
            raise ImageDirError(f"images directory {dest}: {parent} is not a directory", errno=errno.ENOTDIR)
    except (FileNotFoundError, NotADirectoryError):
        raise ImageDirError(f"images directory {dest}: parent directory {parent} does not exist",
                            errno=errno.ENOENT) from None
    except OSError as e:  # e.g. EACCES: say so, not "does not exist"
        raise ImageDirError(f"images directory {dest}: {parent}: {e.strerror}", errno=e.errno) from None
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return dest
    except OSError as e:
        raise ImageDirError(f"images directory {dest}: {e.strerror}", errno=e.errno) from None
    if stat.S_ISLNK(st.st_mode):
        raise ImageDirError(f"images directory {dest} is a symlink: refusing to follow it", errno=errno.ELOOP)
    if not stat.S_ISDIR(st.st_mode):
        raise ImageDirError(f"images directory {dest} exists and is not a directory", errno=errno.EEXIST)
    if os.listdir(dest):
        raise ImageDirError(f"images directory {dest} exists and is not empty", errno=errno.ENOTEMPTY)
    return dest


class Staging:
    """An iteration being written; ``commit()`` renames it to ``dest``, leaving the temp dir removes it."""

    def __init__(self, dest: str) -> None:
        self.dest = check_destination(dest)
        parent, base = os.path.split(self.dest)
        _remove_stale(parent, base)
        _STAGING_PARENTS.add(parent)  # before mkdtemp: an interrupt right after it must not leak the dir
        try:
            self.path = tempfile.mkdtemp(prefix=f".{base}.wpdump-{os.getpid()}-", dir=parent)
        except OSError as e:
            raise describe_os_error(e, self.dest) from None
        self.dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.done = False
        self.unsynced: list[tuple[int, str]] = []  # files written, fsynced together at commit
        self._ahead: Future | None = None  # prepare()'s work
        self._ready: dict[str, int] = {}  # files created ahead, not handed out yet
        self._link: str | None = None  # the parent link created ahead, until symlink() asks for it

    def prepare(self, names: list[str], link: str | None = None) -> None:
        """Create the files ``names`` (and the ``parent`` link to ``link``) in a thread while the caller goes on
        (each creation costs 0.1-0.2 ms on ext4 here): :meth:`create` hands them out, the commit removes those
        never asked for. A file that cannot be created ahead is created (and its error raised) by create()."""
        self._ahead = _syncer.submit(self._create_ahead, names[:_MAX_UNSYNCED], link)

    def _create_ahead(self, names: list[str], link: str | None) -> None:
        for name in names:
            try:
                self._ready[name] = os.open(name, _CREATE, 0o600, dir_fd=self.dfd)
            except OSError:
                return
        if link is not None:
            with contextlib.suppress(OSError):
                os.symlink(link, "parent", dir_fd=self.dfd)
                self._link = link

    def _settle(self) -> None:
        """Wait for prepare()'s thread (nothing may touch the directory's fds before)."""
        if self._ahead is not None:
            wait([self._ahead])
            self._ahead = None

    def _drop_unused(self) -> None:
        """Remove the files created ahead and never asked for."""
        self._settle()
        for name, fd in self._ready.items():
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self.dfd)
        self._ready = {}

    def create(self, name: str) -> int:
        """A new file (mode 0600) in the staging directory; returns its fd."""
        self._settle()
        fd = self._ready.pop(name, None)
        if fd is not None:
            return fd
        try:
            return os.open(name, _CREATE, 0o600, dir_fd=self.dfd)
        except OSError as e:
            raise describe_os_error(e, os.path.join(self.dest, name)) from None

    def write_file(self, name: str, data: bytes) -> None:
        """Create ``name`` holding ``data`` (fsynced at :meth:`commit`, with the others)."""
        fd = self.create(name)
        path = os.path.join(self.dest, name)
        try:
            write_all(fd, data, path)
        except OSError as e:
            os.close(fd)
            raise describe_os_error(e, path) from None
        self.keep(fd, name)

    def keep(self, fd: int, name: str) -> None:
        """Take over ``fd``, a file the caller created with :meth:`create` and wrote: it is fsynced at :meth:`commit`
        with the others (at once) and closed by this object."""
        self.unsynced.append((fd, os.path.join(self.dest, name)))
        if len(self.unsynced) >= _MAX_UNSYNCED:  # a tree of many processes: bounded open files
            _fsync_all(self.unsynced)
            self._close_files()

    def remove(self, name: str) -> None:
        """Remove ``name`` from the staging directory, if it is there (and close it if it was kept)."""
        self._settle()
        fd = self._ready.pop(name, None)
        if fd is not None:
            os.close(fd)
        path = os.path.join(self.dest, name)
        for fd, p in [u for u in self.unsynced if u[1] == path]:
            self.unsynced.remove((fd, p))
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.dfd)

    def symlink(self, target: str, name: str = "parent") -> None:
        self._settle()
        if name == "parent" and self._link is not None:
            link, self._link = self._link, None
            if link == target:
                return
            os.unlink(name, dir_fd=self.dfd)
        os.symlink(target, name, dir_fd=self.dfd)

    def commit(self) -> str:
        """fsync the files written and the directory, and rename it to ``dest`` (replacing an empty directory);
        returns dest."""
        self._drop_unused()
        if self._link is not None:  # created ahead for a parent the iteration did not name after all
            os.unlink("parent", dir_fd=self.dfd)
            self._link = None
        _fsync_all([*self.unsynced, (self.dfd, self.dest)])
        self._close_files()
        try:
            os.rename(self.path, self.dest)
            pfd = os.open(os.path.dirname(self.dest), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(pfd)
            finally:
                os.close(pfd)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise ImageDirError(f"images directory {self.dest} exists and is not empty", errno=e.errno) from None
            raise describe_os_error(e, self.dest) from None
        self.done = True
        self.close()
        return self.dest

    def _close_files(self) -> None:
        for fd, _ in self.unsynced:
            os.close(fd)
        self.unsynced = []

    def close(self) -> None:
        self._settle()
        for fd in self._ready.values():
            os.close(fd)
        self._ready = {}
        self._close_files()
        if self.dfd >= 0:
            os.close(self.dfd)
            self.dfd = -1
        if not self.done:
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_own_leftovers() -> None:
    """Remove staging directories this process created and did not finish (called when interrupted:
    a KeyboardInterrupt can land between mkdtemp and the with-block that would have removed them)."""
    mark = f".wpdump-{os.getpid()}-"
    for parent in _STAGING_PARENTS:
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for name in names:
            if name.startswith(".") and mark in name:
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _remove_stale(parent: str, base: str) -> None:
    """Remove temporary directories of ``base`` left by writers that were killed (their pid is gone)."""
    prefix = f".{base}.wpdump-"
    for name in os.listdir(parent):
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not exists(int(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def fsync(fd: int, what: str) -> None:
    """fsync ``fd``; an error (ENOSPC, EIO) becomes one line naming ``what``."""
    try:
        os.fsync(fd)
    except OSError as e:
        raise describe_os_error(e, what) from None


def write_all(fd: int, data: bytes | memoryview, what: str) -> None:
    """os.write until everything is written (raises OSError, e.g. ENOSPC)."""
    view = memoryview(data).cast("B")
    while len(view):
        n = os.write(fd, view)
        view = view[n:]


def stat_dir(path: str, below: str | None = None, pid: int | None = None) -> os.stat_result:
    """stat an images directory; ChainError saying why it cannot be used (missing, unreadable, not a directory)."""
    of = f" (parent of {below})" if below else ""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise ChainError(f"images directory {path}{of} does not exist", pid=pid, errno=errno.ENOENT) from None
    except OSError as e:
        raise ChainError(f"images directory {path}{of}: {e.strerror}", pid=pid, errno=e.errno) from None
    if not stat.S_ISDIR(st.st_mode):
        raise ChainError(f"images directory {path}{of} is not a directory", pid=pid, errno=errno.ENOTDIR)
    return st


def parent_of(path: str) -> str | None:
    """The directory the ``parent`` link of ``path`` points to, or None when there is no link."""
    link = os.path.join(path, "parent")
    if not os.path.islink(link):
        return None
    return os.path.normpath(os.path.join(path, os.readlink(link)))


def walk_links(path: str, pid: int | None = None) -> Iterator[tuple[str, ChainError | None]]:
    """The directories from ``path`` down its parent links: (dir, None) for each usable one; the walk ends with
    (dir, why) at a missing or unusable directory or at a loop."""
    seen: set[tuple[int, int]] = set()
    cur: str | None = os.path.normpath(path)
    child: str | None = None
    while cur is not None:
        try:
            st = stat_dir(cur, child, pid)
        except ChainError as e:
            yield cur, e
            return
        if (st.st_dev, st.st_ino) in seen or len(seen) >= MAX_DEPTH:
            yield cur, ChainError(f"{path}: the parent links form a loop at {cur}", pid=pid, errno=errno.ELOOP)
            return
        seen.add((st.st_dev, st.st_ino))
        yield cur, None
        child, cur = cur, parent_of(cur)
