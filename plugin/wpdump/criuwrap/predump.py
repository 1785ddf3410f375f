"""A pre-dump for a runtime: wpdump's engine into a directory the runtime made (and may have put its log in)."""

from __future__ import annotations

import errno
import os

from ..dump import iteration
from ..errors import WpdumpError
from .criulog import Log


def _stash(images_dir: str) -> str | None:
    """Move what the runtime left in ``images_dir`` aside (the engine commits by renaming over an empty
    directory); the stash directory, or None if there was nothing."""
    names = os.listdir(images_dir)
    if not names:
        return None
    stash = f"{images_dir}.wpdump-criu-{os.getpid()}"
    os.mkdir(stash, 0o700)
    for n in names:
        os.rename(os.path.join(images_dir, n), os.path.join(stash, n))
    return stash


def _unstash(stash: str | None, images_dir: str) -> None:
    if stash is None:
        return
    for n in os.listdir(stash):
        dst = os.path.join(images_dir, n)
        if not os.path.lexists(dst):  # never over an image the engine wrote
            os.rename(os.path.join(stash, n), dst)
    try:
        os.rmdir(stash)
    except OSError:
        pass


def run_pre_dump(pid: int, images_dir: str, parent: str | None, log: Log) -> tuple[str, int] | None:
    """Pre-dump ``pid`` into ``images_dir`` (``parent`` as CRIU's --prev-images-dir: relative to it); None on
    success, else (message, errno) after logging the error."""
    log.info(f"pre-dump of pid {pid} into {images_dir}" + (f", parent {parent}" if parent else ""))
    stash = None
    try:
        stash = _stash(images_dir)
        res = iteration.pre_dump(pid, images_dir, parent)
    except WpdumpError as e:
        return log.error(f"pre-dump of pid {pid} failed: {e}"), e.errno or errno.EIO
    except OSError as e:
        return log.error(f"pre-dump of pid {pid} failed: {e}"), e.errno or errno.EIO
    except Exception as e:  # noqa: BLE001 - a runtime must never take a failed pre-dump for a good one
        return log.error(f"pre-dump of pid {pid} failed: {type(e).__name__}: {e}"), errno.EIO
    finally:
        try:
            _unstash(stash, images_dir)
        except OSError as e:
            log.error(f"cannot move {stash} back into {images_dir}: {e}")
    for w in res.warnings:
        log.info(f"warning: {w}")
    log.info(
        f"pre-dump of pid {pid} done ({'incremental' if res.incremental else 'full'}): {res.pages_written} pages "
        f"written, {res.pages_parent} in the parent, {res.pages_scanned} scanned, in {res.total_s * 1e3:.0f} ms"
    )
    return None
