"""The blocking core of a `TempFileManager`: its directory, lock and fds.

Thread-safe and loop-free, so it can be tested without an event loop; the
async `TempFileManager` is a one-hop facade over it.  Operations run in worker
threads and use the descriptors, so `ManagerCore.close` waits until none is
in flight before it closes them (a closed fd number can be reused for another
file).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import sys
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

from .._errors import InvalidNameError
from .._paths import confine, open_beneath, open_dir_nofollow
from ._base import choose_base, lookup_username, open_userdir
from ._procdirs import (
    LOCK_NAME,
    Verdict,
    clean,
    create_entry,
    create_process_dir,
    remove_own_dir,
    remove_tree,
    userdir_name,
)

__all__ = ("ManagerCore", "Opened")


@dataclass(frozen=True)
class Opened:
    """What a started manager holds: its paths and its open descriptors."""

    base: str
    userdir: str
    dir: str
    real_dir: str  # dir with symlinks in the base resolved, as confine() sees it
    dir_name: str
    userdir_fd: int
    dir_fd: int
    lock_fd: int
    owner_pid: int


class ManagerCore:
    """What a `TempFileManager` owns, and the blocking half of each operation."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._username: str | None = None
        # Guards the fields below (see the module docstring).
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self.opened: Opened | None = None
        self._busy = 0
        self.closed = False
        _cores.add(self)

    def username(self) -> str:
        if self._username is None:
            self._username = lookup_username()
        return self._username

    def started(self) -> Opened:
        opened = self.opened
        if opened is None:
            raise RuntimeError(
                "this TempFileManager has not started yet: use 'async with' or await one of"
                " its coroutines (for example gettempdir()) first"
            )
        return opened

    # -- lifecycle (blocking parts, in a worker thread) ---------------------

    def start(self) -> Opened:
        """Choose the base, vet userdir, create and lock dir (caller holds _cond)."""
        if self.closed:
            raise RuntimeError(
                f"{self!r} was cleaned up; create a new TempFileManager"
                " (or call get_manager() again)"
            )
        if self.opened is not None:
            return self.opened
        base = choose_base()
        name = userdir_name(self.prefix, self.username())
        userdir = os.path.join(base, name)
        userdir_fd = open_userdir(base, name, create=True)
        assert userdir_fd is not None
        try:
            dir_name, lock_fd = create_process_dir(userdir_fd, userdir)
            try:
                dir_fd = open_dir_nofollow(dir_name, dir_fd=userdir_fd)
            except BaseException:
                os.close(lock_fd)
                remove_own_dir(userdir_fd, dir_name)
                raise
        except BaseException:
            os.close(userdir_fd)
            raise
        directory = os.path.join(userdir, dir_name)
        self.opened = Opened(
            base=base,
            userdir=userdir,
            dir=directory,
            real_dir=os.path.realpath(directory),
            dir_name=dir_name,
            userdir_fd=userdir_fd,
            dir_fd=dir_fd,
            lock_fd=lock_fd,
            owner_pid=os.getpid(),
        )
        atexit.register(self.at_exit)
        return self.opened

    def ensure_started(self) -> Opened:
        """Start the manager if needed (in a worker thread)."""
        with self._cond:
            return self.start()

    # _enter/_leave bracket every operation (plain calls, not a context
    # manager: they run twice per operation and a generator-based one costs
    # more than the rest of a remove_path).
    def enter(self) -> Opened:
        """Start if needed, and keep cleanup from closing the fds until `_leave`."""
        with self._lock:
            opened = self.start()
            self._busy += 1
        return opened

    def leave(self) -> None:
        with self._lock:
            self._busy -= 1
            if self.closed and not self._busy:
                self._cond.notify_all()

    def close(self) -> None:
        """Release the lock, then delete `dir` (blocking); safe to call twice."""
        with self._cond:
            if self.closed:
                return
            self.closed = True
            opened = self.opened
            if opened is None:
                return  # never started: nothing on disk
            atexit.unregister(self.at_exit)
            forked = os.getpid() != opened.owner_pid
            if not forked:
                self._cond.wait_for(lambda: not self._busy)
        os.close(opened.dir_fd)
        if forked:
            # A forked child shares the parent's open file description:
            # LOCK_UN here would release the *parent's* lock and deleting
            # would pull the directory from under it.  Just let go.
            os.close(opened.lock_fd)
            os.close(opened.userdir_fd)
            return
        try:
            # Lock first: if deleting fails halfway, what is left has an
            # unheld .lock and any later clean_userdir finishes the job.
            try:
                fcntl.flock(opened.lock_fd, fcntl.LOCK_UN)
            finally:
                os.close(opened.lock_fd)
            remove_own_dir(opened.userdir_fd, opened.dir_name)
        finally:
            os.close(opened.userdir_fd)

    def at_exit(self) -> None:
        try:
            self.close()
        except Exception as exc:  # an exit hook must not hide the program's own outcome
            where = self.opened.dir if self.opened else self.prefix
            sys.stderr.write(f"atempstore: could not remove {where!r} at exit: {exc}\n")

    def create_path(self, prefix: str, suffix: str, folder: bool) -> Path:
        opened = self.enter()
        try:
            name = create_entry(opened.dir_fd, prefix, suffix, folder)
        finally:
            self.leave()
        return Path(f"{opened.dir}/{name}")

    def discard_created(self, path: Path) -> None:
        """Undo a `create_path` whose caller was cancelled: nobody knows the name."""
        opened = self.enter()
        try:
            with contextlib.suppress(FileNotFoundError):
                remove_tree(opened.dir_fd, path.name)
        finally:
            self.leave()

    def remove_path(self, name: str) -> None:
        opened = self.enter()
        try:
            head, leaf = os.path.split(name)
            if head in ("", opened.dir, opened.real_dir) and leaf not in ("", ".", ".."):
                # The common case, a name directly in dir (what create_path
                # returned): nothing to resolve, act on the held dir fd.
                if "\0" in leaf:
                    why = f"invalid path {name!r}: it contains a NUL byte"
                    raise InvalidNameError(why, name=name)
                parent_fd, parents = opened.dir_fd, False
            else:
                target = confine(opened.real_dir, name)
                leaf, parents = target.name, bool(target.parents)
                parent_fd = open_beneath(target.root, target.parents)
            try:
                if leaf == LOCK_NAME and not parents:
                    raise InvalidNameError(
                        f"{name!r} is the manager's own lock file: it must live as long as"
                        " the manager",
                        name=name,
                    )
                remove_tree(parent_fd, leaf)
            finally:
                if parent_fd != opened.dir_fd:
                    os.close(parent_fd)
        finally:
            self.leave()

    def clean_tempdir(self) -> None:
        opened = self.enter()
        try:
            # A fresh open file description to list: the held one's read offset
            # is shared by every thread that might list it at the same time.
            listing_fd = open_dir_nofollow(".", dir_fd=opened.dir_fd)
            try:
                with os.scandir(listing_fd) as entries:
                    names = [entry.name for entry in entries if entry.name != LOCK_NAME]
            finally:
                os.close(listing_fd)
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    remove_tree(opened.dir_fd, name)
        finally:
            self.leave()

    def clean_userdir(self, grace: float) -> list[Verdict]:
        opened = self.enter()
        try:
            return clean(opened.userdir_fd, Path(opened.userdir), opened.dir_name, grace, False)
        finally:
            self.leave()

    def usable_here(self) -> bool:
        opened = self.opened
        return opened is not None and not self.closed and opened.owner_pid == os.getpid()


_cores: weakref.WeakSet[ManagerCore] = weakref.WeakSet()


def _reinit_after_fork() -> None:
    # A lock held by another thread at fork() time stays held forever in the
    # child; the child's exit hook must still be able to run.
    for core in list(_cores):
        core._lock = threading.Lock()
        core._cond = threading.Condition(core._lock)
        core._busy = 0


os.register_at_fork(after_in_child=_reinit_after_fork)
