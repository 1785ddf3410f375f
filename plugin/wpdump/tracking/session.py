"""The keeper session, used by every command that works with a tree's trackers: check them out of the
tree's keeper and adopt them, then check them back in (tracking goes on) or end tracking.

A checkout without a check-in makes the keeper end tracking when the connection closes, so a command that
dies never leaves a keeper holding a dirty set someone consumed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from typing import TYPE_CHECKING

from .. import signals
from ..errors import NoSuchProcess, TargetExeced, WpdumpError
from ..target.tree import Member
from . import keeper
from .tracker import Harvest, Tracker

if TYPE_CHECKING:  # the iteration's parent; tracking itself does not read images
    from ..images.chain import Iteration

log = logging.getLogger("wpdump.session")

class KeeperSession:
    """A connection to the keeper of the tree rooted at ``pid``: :meth:`take` checks its trackers out."""

    def __init__(self, pid: int, k: keeper.Keeper) -> None:
        self.pid, self.keeper = pid, k
        self.trackers: dict[str, Tracker] = {}  # adopted, keyed PID-STARTTICKS
        self.checked_out: str | None = None  # the iteration the keeper tracked since, while checked out
        self.refused: dict = {}  # what the keeper tracked since, when take(since) found another iteration
        self.since_dir = ""  # the images directory the keeper tracked since, once taken
        self.reply_due = False  # a checkin was sent, its answer not read yet

    @classmethod
    def connect(cls, pid: int, start_ticks: int | None = None) -> KeeperSession | None:
        """The session with the keeper of ``pid`` (started at ``start_ticks``, if known), or None when no keeper
        tracks it."""
        k = keeper.Keeper.connect(pid, start_ticks)
        return None if k is None else cls(pid, k)

    def status(self) -> dict:
        return self.keeper.status()

    def take(self, since: str | None = None) -> dict[str, Tracker] | None:
        """Check the trackers out and adopt them, keyed PID-STARTTICKS; a process that is gone (or whose pid now
        names another) is left out. With ``since``: only if they have tracked since that iteration, else None
        (``refused`` then holds the keeper's "iteration" and "images_dir"). Ctrl-C is held back until the checkout
        is recorded in ``checked_out`` (so that a caller's cleanup can give it back)."""
        with signals.held():
            reply, members = self.keeper.checkout_since(since)
            if members is None:
                self.refused = reply
                return None
            self.checked_out = reply["iteration"]
            self.since_dir = reply.get("images_dir", "")
        for i, m in enumerate(members):
            try:
                self.trackers[f"{m.pid}-{m.start_ticks}"] = Tracker.adopt(m.pid, m.uffd, m.state)  # owns the fd
            except NoSuchProcess:
                continue
            except BaseException:
                for rest in members[i + 1 :]:
                    os.close(rest.uffd)
                raise
        return self.trackers

    def giveback(self) -> None:
        """Give the checkout back unchanged: tracking goes on as before it."""
        self.keeper.giveback()
        self.checked_out = None

    def checkin(self, trackers: list[Tracker], iteration: str, images_dir: str, kind: str = "iteration") -> None:
        """Give ``trackers`` (the tree's processes now) back: tracking goes on."""
        self.keeper.checkin(_members(trackers), iteration, images_dir, kind=kind)
        self.checked_out = None

    def checkin_send(self, trackers: list[Tracker], iteration: str, images_dir: str) -> None:
        """:meth:`checkin` without waiting for the keeper's answer: :meth:`checkin_reply` reads it."""
        self.keeper.checkin_send(_members(trackers), iteration, images_dir)
        self.reply_due = True

    def checkin_reply(self) -> None:
        """The answer to :meth:`checkin_send` (KeeperError if the keeper refused the checkin)."""
        self.reply_due = False
        self.keeper.checkin_reply()
        self.checked_out = None

    def untrack(self, quiet: bool = False, wait: bool = True) -> None:
        """End tracking (``quiet``: a keeper that is gone or fails already ended it; ``wait``: until it exited)."""
        try:
            self.keeper.untrack(wait)
        except keeper.KeeperError:
            if not quiet:
                raise

    def close(self) -> None:
        """Close the trackers and the connection (a checkout not checked in: the keeper ends tracking)."""
        try:
            for tr in self.trackers.values():
                tr.close()
            self.trackers = {}
        finally:
            self.keeper.close()

    def __enter__(self) -> KeeperSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _members(trackers: list[Tracker]) -> list[keeper.Member]:
    return [keeper.Member(t.pid, t.start_ticks, t.uffd_fd, t.export_state()) for t in trackers]


class Tracking:
    """The trackers of a tree for one iteration: taken from the tree's keeper when it has tracked since the
    parent, else attached afresh per process (a full iteration of that process). Handed back to a keeper when
    the iteration is complete."""

    def __init__(
        self, root: int, start_ticks: int, parent: Iteration | None, warnings: list[str],
        allow_userfaultfd_target: bool = False,
    ) -> None:
        self.pid, self.start_ticks, self.warnings = root, start_ticks, warnings
        self.allow_userfaultfd_target = allow_userfaultfd_target
        self.trackers: dict[str, Tracker] = {}
        self.fresh: set[str] = set()
        self.harvested = False  # once a harvest began, the dirty information since the parent is this run's
        self.since = ""  # the images directory the keeper tracked since
        self.send_error: keeper.KeeperError | None = None  # the checkin could not be sent (send_back)
        self.session = KeeperSession.connect(root, start_ticks)
        if self.session is not None and parent is not None and parent.iteration_id:
            if self._take(parent.iteration_id):
                log.info("pid %d: tracking taken over from its keeper (tracked since %s)", root, self.since)
                return
        if self.session is not None:
            if parent is not None:
                since = self.session.refused.get("images_dir") or "another iteration"
                self._warn(f"pid {root} has been tracked since {since}, not since the parent {parent.path}: writing a "
                           "full iteration")
            self._drop_keeper(untrack=True)
        elif parent is not None:
            self._warn(f"pid {root} is not tracked since the parent {parent.path} (no keeper): writing a full "
                       "iteration")

    def _take(self, since: str) -> bool:
        """Check the trackers out of the keeper if it has tracked since the iteration ``since`` (one round trip);
        an interrupt or failure after that gives them back, so tracking never ends by accident. A keeper that
        went away meanwhile is dropped (False, as one that tracked since another iteration)."""
        assert self.session is not None
        try:
            trackers = self.session.take(since)
        except keeper.KeeperError as e:
            if e.errno != errno.EPIPE:  # refused (checked out by another invocation): as before, an error
                self.abandon()
                raise
            self._drop_keeper(untrack=False)
            return False
        except BaseException:
            self.abandon()
            raise
        if trackers is None:
            return False
        self.since = self.session.since_dir
        self.trackers = trackers
        self.session.trackers = {}  # closed by this object
        return True

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

    def incremental(self, m: Member) -> bool:
        """Whether ``m``'s harvest held only what it wrote since the parent (not a fresh attach)."""
        return m.key in self.trackers and m.key not in self.fresh

    def harvest(self, m: Member, full: bool = False) -> Harvest:
        """The pages ``m`` wrote since the parent (incremental), or all its content after a fresh attach (also
        when ``full``: the parent holds no image of this very process to refer to)."""
        self.harvested = True
        tr = self.trackers.get(m.key)
        if tr is not None and full:
            log.info("pid %d: the parent holds no image of it: tracking it again from scratch", m.pid)
            self._forget(m)
            tr = None
        if tr is not None:
            try:
                return tr.harvest()
            except TargetExeced as e:
                self._warn(f"{e}: tracking it again from scratch, writing it in full")
                self._forget(m)
        log.info("pid %d: attaching (a full iteration of it)", m.pid)
        tr = Tracker(m.pid, allow_userfaultfd_target=self.allow_userfaultfd_target)
        self.trackers[m.key] = tr
        self.fresh.add(m.key)
        return tr.initial

    def _forget(self, m: Member) -> None:
        """Close ``m``'s tracker here and in the keeper: every write-protection of it is gone."""
        self.trackers.pop(m.key).close()
        if self.session is not None:
            self.session.keeper.drop(m.pid, m.start_ticks)

    def _close(self) -> None:
        for tr in self.trackers.values():
            tr.close()
        self.trackers = {}

    def send_back(self, members: list[Member], iteration: str, images_dir: str) -> None:
        """Before the commit of a complete iteration of ``members`` that keeps tracking: send their trackers to the
        keeper, whose answer :meth:`hand_back` reads after the commit (the keeper takes them while the files are
        synced). A failure is reported by :meth:`hand_back`; a failed commit then ends tracking (:meth:`abandon`)."""
        if self.session is None:
            return
        trs = [self.trackers[m.key] for m in members if m.key in self.trackers]
        try:
            self.session.checkin_send(trs, iteration, images_dir)
        except keeper.KeeperError as e:
            self.send_error = e

    def hand_back(self, members: list[Member], iteration: str, images_dir: str, keep: bool) -> None:
        """After a complete iteration of ``members``: give their trackers to the keeper (or start one), or end
        tracking. Trackers of processes that left the tree are closed."""
        try:
            if not keep:
                self._drop_keeper(untrack=True)
                log.info("pid %d: tracking ends", self.pid)
                return
            trs = [self.trackers[m.key] for m in members if m.key in self.trackers]
            if self.session is not None:
                if self.send_error is not None:  # the keeper went away: tracking ends with these trackers
                    e, self.send_error = self.send_error, None
                    self._drop_keeper(untrack=False)
                    raise e
                if self.session.reply_due:
                    self.session.checkin_reply()
                else:
                    self.session.checkin(trs, iteration, images_dir)
                self._drop_keeper(untrack=False)
            else:
                keeper.spawn(self.pid, self.start_ticks, _members(trs), iteration, images_dir).close()
        finally:
            self._close()

    def abandon(self) -> None:
        """After a failure or an interrupt: before any harvest the keeper gets its trackers back unchanged
        (tracking goes on); after one the dirty information since the parent is gone, so tracking ends (the
        keeper is told, not left to notice, so that the state is settled when the command reports it)."""
        self._close()
        if self.session is None:
            return
        if self.session.reply_due:  # the checkin was sent before the failure: its answer comes first
            with contextlib.suppress(keeper.KeeperError):
                self.session.checkin_reply()
        if not self.harvested and self.session.checked_out is not None:
            try:
                self.session.giveback()
                log.info("pid %d: nothing harvested: the keeper tracks on since %s", self.pid, self.since)
                self._drop_keeper(untrack=False)
                return
            except (keeper.KeeperError, WpdumpError):
                pass
        log.info("pid %d: tracking ends with the failed iteration", self.pid)
        self._drop_keeper(untrack=True)
