"""The flock primitive every component waits on.

Owns: the non-blocking try (`try_lock_exclusive`), the waiting thread that
blocks in ``flock`` for a task (`Waiter`) and the "ghosts" it leaves when the
task gives up, the per-file turnstile that queues a loop's tasks behind one
such thread, and the event-driven wait built from them (`await_grant`,
`wait_for_lock`).  `_locks` (the portalocker API) and every component that
asks "is the owner of this lock file alive?" or waits for a lock sit on top of
this module; it knows nothing of their files, modes or errors.

``flock`` locks belong to an *open file description*, not to a process, so
two tasks of one process that each open the lock file exclude each other, and
an unrelated ``open()``/``close()`` of the same file never drops a lock (the
trap of POSIX ``fcntl`` record locks).

Waiting is event-driven.  A task that finds the lock held hands a *blocking*
``flock`` to a daemon thread (`_threads.run_wait`, outside the pool that file
operations use); the kernel wakes that thread the moment the holder lets go,
and the thread wakes the task with ``call_soon_threadsafe``.  There is no
``check_interval`` sleep in between, so a handoff costs tens of microseconds
instead of half a polling interval.  Within one event loop the tasks waiting
for the same file queue in FIFO order behind a per-file `turnstile`, so only
the head of the queue occupies a thread: a hundred waiting tasks cost one
blocked thread, not a hundred.

A cancelled or timed-out wait cannot interrupt the blocked ``flock``, so the
thread blocks on a descriptor of its own and the task walks away from it (a
ghost, see `Waiter`).  Which descriptor matters, because a ghost that is
granted the lock later gives it back with ``LOCK_UN`` on *its open file
description*:

* A caller that closes its descriptor when it gives up (`Lock` opens a
  private file for each acquire; `wait_for_lock`'s callers) lets the thread
  block on a ``dup``: nothing but the ghost ever uses that description again.
* A caller that keeps its descriptor (`lock` on the user's file, which may be
  locked again right after a timeout) must not share a description with a
  ghost, whose late unlock would drop the retry's lock (issue 11: 5 of 5
  trials).  So `moving_waiter` blocks on a *new* open file description of the
  same file (``/proc/self/fd``) and, once granted there, moves the lock over:
  it unlocks its own and takes the caller's with ``LOCK_NB`` (if another
  holder slipped in between, it waits again).  Such a ghost only ever touches
  its own description.

A grant the thread is handing over when the task gives up is waited for and
then given back (or handed over, when the caller asked for an irreversible
step such as the truncation of `Lock` mode ``"w"``: see `_locks`); a ghost
grant is given back by the thread itself, and a release in this process waits
for this process's ghosts of the file (`unlock_releasing_ghosts`), so that the
lock is free when it returns.

Everything here but `await_grant`, `await_grant_for`, `wait_for_lock` and
`turnstile` is plain blocking code for a worker thread; those are the thin
async bridge.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import threading
import time
import weakref
from collections.abc import Callable
from contextlib import suppress
from typing import Literal

from ._threads import _call_soon, _shielded, _wake, run_sync, run_wait

__all__ = (
    "GHOST_WAIT",
    "WOULD_BLOCK",
    "Waiter",
    "await_grant",
    "await_grant_for",
    "close_quietly",
    "dup_with_key",
    "file_key",
    "moving_waiter",
    "try_lock_exclusive",
    "turnstile",
    "unlock_releasing_ghosts",
    "wait_for_lock",
)

#: The errnos of a non-blocking ``flock`` on a file locked elsewhere.
WOULD_BLOCK = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES})


def try_lock_exclusive(fd: int) -> bool:
    """Take an exclusive flock on ``fd`` without waiting; False if held elsewhere.

    Blocking-free, but call it in a worker thread with the rest of the syscall
    sequence it belongs to (it is how every component asks "is the owner of
    this lock file still alive?").
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def file_key(fd: int) -> tuple[int, int]:
    """(device, inode) of ``fd``'s file: what ghosts and turnstiles are keyed by."""
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


def close_quietly(fd: int | None) -> None:
    if fd is not None:
        with suppress(OSError):
            os.close(fd)


_WaiterState = Literal["waiting", "abandoned", "committed", "done"]


class Waiter:
    """One blocking ``flock`` in a daemon thread that the task may walk away from.

    The thread owns its descriptors: ``fd``, the one it blocks on, and, when
    it moves the lock over to another description (`moving_waiter`),
    ``target``, a ``dup`` of that one.  It closes both itself before it
    finishes, so the task never makes a syscall for it.

    States, changed under a mutex the task's cancellation takes too:
    ``waiting`` (blocked in flock) -> ``committed`` (granted while the task
    still waited: the thread finishes the grant, moving it over or running
    ``then``, e.g. the truncation of mode ``"w"``) -> ``done``.  A task that
    gives up while ``waiting`` makes it ``abandoned``: a "ghost".  A blocked
    ``flock`` cannot be called off, so a ghost still takes the lock on its own
    description for a moment once the holder lets go, until its thread gets
    the GIL back and unlocks.  Ghosts are registered by file (`_ghosts`) so
    that a release in this process can wait them out
    (`unlock_releasing_ghosts`): when ``release()`` returns, the lock is free.
    A task that gives up while ``committed`` waits for ``done``; `granted`
    then says whether it owns a lock it must give back or hand over.
    """

    __slots__ = (
        "_fd",
        "_finished",
        "_kind",
        "_loop",
        "_mutex",
        "_state",
        "_target",
        "_then",
        "error",
        "gone",
        "granted",
        "key",
    )

    def __init__(
        self,
        fd: int,
        kind: int,
        key: tuple[int, int],
        *,
        target: int | None = None,
        then: Callable[[int], None] | None = None,
    ) -> None:
        self._fd = fd
        self._kind = kind
        self._target = target
        self._then = then
        self.key = key
        self._mutex = threading.Lock()
        self._state: _WaiterState = "waiting"
        self._finished: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: OSError | None = None
        self.granted = False
        self.gone = threading.Event()

    def run(self) -> None:  # in the waiting thread
        holding = False  # whether self._fd's description holds the lock
        try:
            while True:
                with self._mutex:
                    if self._abandoned():
                        return  # given up before this thread ever blocked
                fcntl.flock(self._fd, self._kind)
                holding = True
                with self._mutex:
                    if self._abandoned():
                        return  # a ghost: the finally gives the lock back
                    self._state = "committed"
                if self._target is None:
                    self.granted = True
                    if self._then is not None:
                        self._then(self._fd)
                    return
                # Move the grant over to the caller's description.
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                holding = False
                try:
                    fcntl.flock(self._target, self._kind | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno not in WOULD_BLOCK:
                        raise
                    # Another holder slipped in between: wait again, unless
                    # the task gave up meanwhile (it waits for this to end).
                    with self._mutex:
                        if self._finished is not None:
                            return
                        self._state = "waiting"
                    continue
                self.granted = True
                return
        except OSError as exc:
            self.error = exc
        finally:
            self._finish(holding)

    def _abandoned(self) -> bool:  # under the mutex
        return self._state == "abandoned"

    def _finish(self, holding: bool) -> None:
        with self._mutex:
            ghost = self._state == "abandoned"
            self._state = "done"
            finished = self._finished
        try:
            if ghost and holding:
                with suppress(OSError):
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
            close_quietly(self._fd)
            close_quietly(self._target)
        finally:
            if ghost:
                _forget_ghost(self)
            if finished is not None and self._loop is not None:
                _call_soon(self._loop, _wake, finished)

    def abandon(self) -> asyncio.Future[None] | None:
        """Give up the wait (on the loop, no syscall).  None: the thread
        will clean up after itself; else a future to wait for, after which
        `granted` and `error` are final."""
        with self._mutex:
            if self._state == "waiting":
                self._state = "abandoned"
                with _ghosts_mutex:
                    _ghosts.setdefault(self.key, set()).add(self)
                return None
            if self._state == "committed":
                self._loop = asyncio.get_running_loop()
                self._finished = self._loop.create_future()
                return self._finished
            return None

    def close_unstarted(self) -> None:
        """Close the descriptors of a waiter whose thread never started
        (its caller was cancelled first; in a worker thread)."""
        close_quietly(self._fd)
        close_quietly(self._target)


# Abandoned waiters by (device, inode) of their file; see `Waiter`.
_ghosts: dict[tuple[int, int], set[Waiter]] = {}
_ghosts_mutex = threading.Lock()
#: How long a release waits for this process's ghosts of the file.  A ghost
#: that is still blocked after that lost the lock to another process.
GHOST_WAIT = 0.05


def _forget_ghost(waiter: Waiter) -> None:
    with _ghosts_mutex:
        waiting = _ghosts.get(waiter.key)
        if waiting is not None:
            waiting.discard(waiter)
            if not waiting:
                del _ghosts[waiter.key]
    waiter.gone.set()


def _ghosts_of(fd: int) -> list[Waiter]:
    """This process's ghosts waiting for ``fd``'s file (none: no syscall at all).
    In a worker thread: it may fstat ``fd``."""
    if not _ghosts:
        return []
    key = file_key(fd)
    with _ghosts_mutex:
        return list(_ghosts.get(key, ()))


def _wait_out_ghosts(ghosts: list[Waiter]) -> None:
    deadline = time.monotonic() + GHOST_WAIT
    for ghost in ghosts:
        ghost.gone.wait(max(0.0, deadline - time.monotonic()))


def unlock_releasing_ghosts(fd: int) -> None:
    """Unlock ``fd``, then let this process's ghosts of the file take and
    drop the lock (they need the GIL, which a loop that never awaits would
    keep), so that the lock is free when this returns.  In a worker thread."""
    ghosts = _ghosts_of(fd)
    fcntl.flock(fd, fcntl.LOCK_UN)
    _wait_out_ghosts(ghosts)


def dup_with_key(fd: int) -> tuple[int, tuple[int, int]]:
    """A ``dup`` of ``fd`` for a waiting thread, and the file's key."""
    dup = os.dup(fd)
    try:
        return dup, file_key(fd)
    except BaseException:
        os.close(dup)
        raise


# Opening /proc/self/fd/N opens the file anew: a new open file description.
# O_NONBLOCK keeps a FIFO from blocking the open; regular files ignore it.
_REOPEN_FLAGS = os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


def _reopen(fd: int) -> int:
    """A new open file description of ``fd``'s file, for a waiting thread."""
    proc = f"/proc/self/fd/{fd}"
    try:
        return os.open(proc, os.O_RDONLY | _REOPEN_FLAGS)
    except PermissionError:  # a write-only file: flock works on any access mode
        return os.open(proc, os.O_WRONLY | _REOPEN_FLAGS)


def moving_waiter(fd: int, kind: int) -> Waiter:
    """A `Waiter` for a descriptor its caller keeps: it blocks on a new open
    file description of the file and moves the grant over to ``fd``'s (see
    the module docstring).  In a worker thread."""
    target, key = dup_with_key(fd)
    try:
        own = _reopen(fd)
    except BaseException:
        os.close(target)
        raise
    return Waiter(own, kind, key, target=target)


async def await_grant(waiter: Waiter) -> None:
    """Run ``waiter`` in its thread until it has finished with its descriptors.

    If the task is cancelled meanwhile, the wait is abandoned (the thread goes
    on as a ghost) or, if the grant is being committed, waited out; then the
    cancellation propagates and ``waiter.granted`` says whether the caller
    owns a lock it must give back or hand over.
    """
    try:
        await run_wait(waiter.run)
    except BaseException:
        finished = waiter.abandon()
        if finished is not None:
            await _shielded(finished)
        raise


async def await_grant_for(fd: int, waiter: Waiter) -> OSError | None:
    """`await_grant`, for a waiter whose grant ends up held through ``fd``;
    return the error that ended the wait, if any.  If the task is cancelled
    once the grant is held, ``fd``'s lock is given back before the
    cancellation propagates."""
    try:
        await await_grant(waiter)
    except BaseException:
        if waiter.granted:
            await run_sync(fcntl.flock, fd, fcntl.LOCK_UN, shield=True)
        raise
    return waiter.error


async def wait_for_lock(fd: int, kind: int) -> OSError | None:
    """Block (off the loop) until ``fd``'s file can be locked with ``kind``.

    On success the lock is held through ``fd``.  On cancellation nothing is
    held through ``fd``'s open file description by this call once the holder
    lets go (see `Waiter`); the caller still owns ``fd`` and closes it.

    Example:
        ```python
        error = await wait_for_lock(part_fd, fcntl.LOCK_SH)
        if error is not None:
            raise error
        ```
    """
    dup, key = await run_sync(dup_with_key, fd, undo=lambda made: os.close(made[0]))
    return await await_grant_for(fd, Waiter(dup, kind, key))


# Tasks of one event loop waiting for the same file queue here, so that only
# the head of the queue occupies a thread.  Keyed by (device, inode).
_turnstiles: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, weakref.WeakValueDictionary[tuple[int, int], asyncio.Lock]
] = weakref.WeakKeyDictionary()


def turnstile(key: tuple[int, int]) -> asyncio.Lock:
    """The FIFO gate of this loop's tasks waiting for the file ``key``
    (on the loop; no syscall)."""
    loop = asyncio.get_running_loop()
    per_loop = _turnstiles.get(loop)
    if per_loop is None:
        per_loop = _turnstiles[loop] = weakref.WeakValueDictionary()
    gate = per_loop.get(key)
    if gate is None:
        gate = per_loop[key] = asyncio.Lock()
    return gate
