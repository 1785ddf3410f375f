"""The keeper session, used by every command that works with a pid's tracker: check the tracker out of the
pid's keeper and adopt it, then check it back in (tracking goes on) or end tracking.

A checkout without a check-in makes the keeper end tracking when the connection closes, so a command that
dies never leaves a keeper holding a dirty set someone consumed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .. import signals
from ..errors import TargetExeced
from . import keeper
from .tracker import Harvest, Tracker

if TYPE_CHECKING:  # the iteration's parent; tracking itself does not read images
    from ..images.chain import Iteration

log = logging.getLogger("wpdump.session")

class KeeperSession:
    """A connection to the keeper of ``pid``: :meth:`take` checks its tracker out and adopts it."""

    def __init__(self, pid: int, k: keeper.Keeper) -> None:
        self.pid, self.keeper = pid, k
        self.tracker: Tracker | None = None
        self.checked_out: tuple[bytes, str] | None = None  # (state, iteration) as the keeper gave them

    @classmethod
    def connect(cls, pid: int) -> KeeperSession | None:
        """The session with the keeper of ``pid``, or None when no keeper tracks it."""
        k = keeper.Keeper.connect(pid)
        return None if k is None else cls(pid, k)

    def status(self) -> dict:
        return self.keeper.status()

    def take(self) -> Tracker:
        """Check the tracker out and adopt it. Ctrl-C is held back until what was taken is recorded in
        ``checked_out`` (so that a caller's cleanup can check it back in)."""
        with signals.held():
            it_id, fd, state = self.keeper.checkout()
            self.checked_out = (state, it_id)
        self.tracker = Tracker.adopt(self.pid, fd, state)  # owns fd from here, on error too
        return self.tracker

    def checkin(self, state: bytes, iteration: str, images_dir: str, kind: str = "iteration") -> None:
        """Give the tracker back with ``state``: tracking goes on."""
        self.keeper.checkin(state, iteration, images_dir, kind=kind)
        self.checked_out = None

    def untrack(self, quiet: bool = False) -> None:
        """End tracking (``quiet``: a keeper that is gone or fails already ended it)."""
        try:
            self.keeper.untrack()
        except keeper.KeeperError:
            if not quiet:
                raise

    def close(self) -> None:
        """Close the tracker and the connection (a checkout not checked in: the keeper ends tracking)."""
        try:
            if self.tracker is not None:
                self.tracker.close()
                self.tracker = None
        finally:
            self.keeper.close()

    def __enter__(self) -> KeeperSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Tracking:
    """The tracker for one iteration: taken from the pid's keeper when it has tracked since the parent,
    else attached afresh (a full iteration). Handed back to a keeper when the iteration is complete."""

    def __init__(
        self, pid: int, start_ticks: int, parent: Iteration | None, warnings: list[str],
        allow_userfaultfd_target: bool = False,
    ) -> None:
        self.pid, self.start_ticks, self.warnings = pid, start_ticks, warnings
        self.allow_userfaultfd_target = allow_userfaultfd_target
        self.tracker: Tracker | None = None
        self.fresh = False
        self.harvested = False  # once a harvest began, the dirty information since the parent is this run's
        self.since = ""  # the images directory the keeper tracked since
        self.session = KeeperSession.connect(pid)
        status = None
        if self.session is not None:
            try:
                status = self.session.status()
            except keeper.KeeperError:
                self._drop_keeper(untrack=False)
        if self.session is not None and status is not None:
            if parent is not None and parent.iteration_id and parent.iteration_id == status["iteration"]:
                self._take(status)
                log.info("pid %d: tracking taken over from its keeper (tracked since %s)", pid, status["images_dir"])
            else:
                if parent is not None:
                    self._warn(
                        f"pid {pid} has been tracked since {status['images_dir'] or 'another iteration'}, not since "
                        f"the parent {parent.path}: writing a full iteration"
                    )
                self._drop_keeper(untrack=True)
        elif parent is not None:
            self._warn(f"pid {pid} is not tracked since the parent {parent.path} (no keeper): writing a full iteration")

    def _take(self, status: dict) -> None:
        """Check the tracker out of the keeper; an interrupt or failure after that hands it back (abandon), so
        tracking never ends by accident."""
        assert self.session is not None
        self.since = status["images_dir"]
        try:
            self.tracker = self.session.take()
            self.session.tracker = None  # closed by this object
        except BaseException:
            self.abandon()
            raise

    def _warn(self, text: str) -> None:
        log.warning("%s", text)
        self.warnings.append(text)

    def _drop_keeper(self, untrack: bool) -> None:
        if self.session is None:
            return
        if untrack:
            self.session.untrack(quiet=True)
        self.session.close()
        self.session = None

    @property
    def incremental(self) -> bool:
        return not self.fresh

    def harvest(self) -> Harvest:
        """The pages written since the parent (incremental), or all content after a fresh attach."""
        self.harvested = True
        if self.tracker is not None:
            try:
                return self.tracker.harvest()
            except TargetExeced as e:
                self._warn(f"{e}: tracking again from scratch, writing a full iteration")
                self.tracker.close()
                self.tracker = None
                self._drop_keeper(untrack=True)
        log.info("pid %d: attaching (a full iteration)", self.pid)
        self.tracker = Tracker(self.pid, allow_userfaultfd_target=self.allow_userfaultfd_target)
        self.fresh = True
        return self.tracker.initial

    def hand_back(self, iteration: str, images_dir: str, keep: bool) -> None:
        """After a complete iteration: give the tracker to the keeper (or start one), or end tracking."""
        tr = self.tracker
        assert tr is not None
        try:
            if not keep:
                self._drop_keeper(untrack=True)
                log.info("pid %d: tracking ends", self.pid)
                return
            state = tr.export_state()
            if self.session is not None:
                self.session.checkin(state, iteration, images_dir)
                self._drop_keeper(untrack=False)
            else:
                keeper.spawn(self.pid, self.start_ticks, tr.uffd_fd, state, iteration, images_dir).close()
        finally:
            tr.close()

    def abandon(self) -> None:
        """After a failure or an interrupt: before any harvest the keeper gets its tracker back unchanged (tracking
        goes on); after one the dirty information since the parent is gone, so tracking ends (the keeper is told,
        not left to notice, so that the state is settled when the command reports it)."""
        if self.tracker is not None:
            self.tracker.close()
        if self.session is None:
            return
        if not self.harvested and self.session.checked_out is not None:
            state, it_id = self.session.checked_out
            try:
                self.session.checkin(state, it_id, self.since)
                log.info("pid %d: nothing harvested: the keeper tracks on since %s", self.pid, self.since)
                self._drop_keeper(untrack=False)
                return
            except keeper.KeeperError:
                pass
        log.info("pid %d: tracking ends with the failed iteration", self.pid)
        self._drop_keeper(untrack=True)
