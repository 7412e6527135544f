"""Owners and recovery: consumer locks, fork, and giving back what dead consumers held.

Liveness comes from a lock, never from a pid (pids are reused, and a pid says
nothing across containers).  A store takes ``.consumers/<owner>.lock`` before
its first claim and holds it until it is closed or its process dies, when the
kernel lets go.  `recover` takes that lock with ``LOCK_NB``: if it gets it,
the owner is gone and its claims go back to ``new/``.  The lock file is
created under a temporary name, locked, then renamed into place, so a lock
file visible under its final name is never free while its owner lives.

A forked child inherits the parent's lock fd (the same open file
description): at ``fork()`` every store's `Owners` forgets the parent's owner
without touching it.  All of this blocks and runs in worker threads, except
the at-fork hook (inside ``fork()``) and a finalizer's close (handed to a
thread when it runs on a loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import socket
import threading
import time
import weakref
from typing import Protocol

from .._durable import rename_noreplace, unlink_quietly
from .._flock import try_lock_exclusive
from ._names import DIR_MODE, FILE_FLAGS, LOCK_SUFFIX, Layout, parse_claimed, visible_names

__all__ = (
    "Owner",
    "Owners",
    "claims_by_owner",
    "close_quietly",
    "forget_at_fork",
    "give_back",
    "recover",
    "survey",
)

# A consumer's lock file left as ``<owner>.lock.tmp`` by a crash in the
# microseconds between its creation and its rename is removed after this long.
_STALE_LOCK_TMP = 3600.0

#: ``{owner: [(claimed file, message name), ...]}`` for the claims in ``cur/``.
_Claims = dict[str, list[tuple[str, str]]]


def close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _close_off_loop(fd: int) -> None:
    """Close ``fd`` now, or on a thread of its own if called on an event loop.

    The finalizer of a store dropped without `FileStore.aclose` runs wherever
    the garbage collector happens to run, often on the event loop; a close
    there is a syscall on the lock file (a round trip on NFS) that cannot be
    awaited, so it is handed to a thread.  Elsewhere (a worker thread, the
    interpreter's exit) it closes at once.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        close_quietly(fd)
        return
    try:
        threading.Thread(
            target=close_quietly, args=(fd,), name="atempstore close", daemon=True
        ).start()
    except RuntimeError:  # the interpreter is shutting down: no new threads
        close_quietly(fd)


class Owner:
    """One consumer identity of a store: its id, its locked lock file's fd,
    and the process that took it.  A `Message` keeps the owner it was claimed
    under, so it can never act for a later owner of the same store."""

    __slots__ = ("__weakref__", "fd", "finalizer", "id", "pid")

    def __init__(self, owner_id: str, fd: int, anchor: object) -> None:
        self.id = owner_id
        self.fd = fd
        self.pid = os.getpid()
        # Closing the fd is what releases the lock; do it if the store is
        # dropped without aclose(), as a file object would.
        self.finalizer = weakref.finalize(anchor, _close_off_loop, fd)


class Owners:
    """The consumer lock of one store: taken by its first claim, held until it closes.

    Claims and `FileStore.aclose` exclude each other through `mutex`, so no
    claim is ever made under an owner whose lock is being let go.  The
    owner's fd closes when this object is collected (with its store and the
    store's messages).
    """

    __slots__ = ("__weakref__", "current", "layout", "mutex")

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.mutex = threading.Lock()
        self.current: Owner | None = None

    @property
    def id(self) -> str | None:
        current = self.current
        return None if current is None else current.id

    def take(self) -> Owner:
        """Return the current owner, creating and locking its lock file first.

        Call with `mutex` held, in a worker thread.
        """
        if self.current is not None:
            return self.current
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.layout.consumers, DIR_MODE)  # a store prepared by an older version
        owner_id = secrets.token_hex(8)
        final = self.layout.lock_path(owner_id)
        tmp = final + ".tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | FILE_FLAGS, 0o600)
        try:
            # A brand-new file: nobody else can hold its lock yet.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            # Locked before it is visible under its final name: recover()
            # never sees the lock file of a live consumer unlocked.
            os.rename(tmp, final)
        except BaseException:
            os.close(fd)
            unlink_quietly(tmp)
            raise
        owner = self.current = Owner(owner_id, fd, self)
        return owner

    def let_go(self, owner: Owner, *, unlink: bool) -> None:
        """Release ``owner``'s lock (with `mutex` held); its lock file goes too if ``unlink``."""
        if unlink:
            unlink_quietly(self.layout.lock_path(owner.id))
        self.current = None
        owner.finalizer()  # closes the fd: the lock is released

    def forget_inherited(self) -> None:
        """In a forked child: let go of the parent's owner without touching it."""
        # A mutex held by another thread at fork() stays held forever here.
        self.mutex = threading.Lock()
        owner, self.current = self.current, None
        if owner is not None:
            owner.finalizer.detach()  # the fd number is closed now, not again later
            close_quietly(owner.fd)


class _ForgetsAtFork(Protocol):
    def forget_inherited(self) -> None: ...


_forgetters: weakref.WeakSet[_ForgetsAtFork] = weakref.WeakSet()


def forget_at_fork(obj: _ForgetsAtFork) -> None:
    """Have ``obj.forget_inherited()`` called in every forked child (pure Python, no I/O)."""
    _forgetters.add(obj)


def _forget_inherited_owners() -> None:
    # In a forked child, before any of its code runs.  The inherited lock fd
    # shares the parent's open file description: LOCK_UN on it, or giving
    # back the parent's claims, or unlinking its lock file, would wreck the
    # parent, which is still alive (issue 11).  Closing the child's copy
    # leaves the parent's lock held and lets the parent's death be seen even
    # while the child lives.  It runs inside fork(), never on a running loop.
    for obj in list(_forgetters):
        obj.forget_inherited()


os.register_at_fork(after_in_child=_forget_inherited_owners)


def give_back(layout: Layout, claimed: str, name: str) -> None:
    """Move ``cur/<claimed>`` back to ``new/<name>``; never replaces a file there."""
    rename_noreplace(
        os.path.join(layout.dirs["cur"], claimed), os.path.join(layout.dirs["new"], name)
    )


def claims_by_owner(layout: Layout) -> _Claims:
    claims: _Claims = {}
    for claimed in visible_names(layout.dirs["cur"]):
        parsed = parse_claimed(claimed)
        if parsed is not None:
            claims.setdefault(parsed[1], []).append((claimed, parsed[0]))
    return claims


def _consumer_files(layout: Layout) -> tuple[set[str], list[str]]:
    owners: set[str] = set()
    leftovers: list[str] = []
    try:
        with os.scandir(layout.consumers) as entries:
            for entry in entries:
                if entry.name.endswith(LOCK_SUFFIX):
                    owners.add(entry.name[: -len(LOCK_SUFFIX)])
                elif entry.name.endswith(LOCK_SUFFIX + ".tmp"):
                    leftovers.append(entry.name)
    except FileNotFoundError:
        pass
    return owners, leftovers


def _probe(layout: Layout, owner: str) -> int | None:
    """Open ``owner``'s lock file and lock it: an fd if the owner is dead.

    None if the owner is alive (its lock is held) or has no lock file.
    """
    try:
        fd = os.open(layout.lock_path(owner), os.O_RDONLY | FILE_FLAGS)
    except FileNotFoundError:
        return None
    try:
        alive = not try_lock_exclusive(fd)
    except BaseException:
        os.close(fd)
        raise
    if alive:
        os.close(fd)
        return None
    return fd


def recover(layout: Layout, mine: str | None) -> list[str]:
    """Give the claims of dead consumers (all but ``mine``) back to ``new/``; their names.

    Lock files of dead consumers with nothing left in ``cur/`` are removed,
    and temporary lock files a crash left behind once they are old.
    """
    owners, leftovers = _consumer_files(layout)
    owners.update(claims_by_owner(layout))
    owners.discard(mine or "")
    dead: dict[str, int] = {}
    recovered: list[str] = []
    try:
        for owner in owners:
            fd = _probe(layout, owner)
            if fd is not None:
                dead[owner] = fd
        if not dead:
            return recovered
        # List cur/ again *after* the locks were taken: a consumer that
        # claimed between the first listing and its death is seen now.
        claims = claims_by_owner(layout)
        for owner in dead:
            left = 0
            for claimed, name in claims.get(owner, []):
                try:
                    give_back(layout, claimed, name)
                except FileNotFoundError:
                    continue  # another recover() was faster
                except FileExistsError:
                    left += 1  # new/<name> exists: keep this copy where it is
                    continue
                recovered.append(name)
            if not left:
                # Still holding its lock: nobody can mistake it for alive.
                unlink_quietly(layout.lock_path(owner))
    finally:
        for fd in dead.values():
            os.close(fd)
    now = time.time()
    for leftover in leftovers:
        path = os.path.join(layout.consumers, leftover)
        with contextlib.suppress(FileNotFoundError):
            if now - os.lstat(path).st_mtime > _STALE_LOCK_TMP:
                unlink_quietly(path)
    return recovered


def survey(layout: Layout, mine: str | None) -> tuple[int, list[str], list[str]]:
    """The claims in ``cur/``: how many live consumers hold, the names dead ones
    hold (sorted), and the claimed files whose owner has no lock file (sorted).

    Read-only, but a dead owner's lock is taken for the moment of the check.
    """
    live = 0
    dead: list[str] = []
    unknown: list[str] = []
    for owner, held in claims_by_owner(layout).items():
        names = [name for _, name in held]
        if owner == mine:
            live += len(held)
            continue
        if not os.path.exists(layout.lock_path(owner)):
            unknown.extend(claimed for claimed, _ in held)
            continue
        fd = _probe(layout, owner)
        if fd is None:
            live += len(held)
        else:
            os.close(fd)
            dead.extend(names)
    return live, sorted(dead), sorted(unknown)
