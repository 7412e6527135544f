"""The blocking core of `lock`, `unlock` and `Lock`: what each of their hops
does in its worker thread, and the checks of their arguments.

Plain functions and one plain class (`Acquisition`), usable and testable
without an event loop; `_locks` is the async facade that runs each of them in
one `_threads.run_sync` hop and decides what a cancellation means.  Kept apart
from `_flock` because they know about the API's arguments (files, modes,
``fail_when_locked``) and errors, which the shared primitive does not.

Mode ``"w"`` is opened as ``"a"`` (``O_CREAT`` without ``O_TRUNC``) and
truncated only once the lock is held, by the same call that got the grant:
the open-and-try hop (`Acquisition.open_and_try`, only while its caller still
waits: `_threads.caller_cancelled`) or the waiting thread
(`Acquisition.truncate`, run by `_flock.Waiter` once it has committed to the
grant).  A truncation cannot be undone: `Acquisition.truncated` tells the
facade that the handle must be handed over even to a cancelled caller (see
`_locks`).
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
from collections.abc import Callable
from typing import IO, Any, Protocol

from ._errors import AlreadyLocked, LockException
from ._flock import (
    WOULD_BLOCK,
    Waiter,
    close_quietly,
    file_key,
    moving_waiter,
    unlock_releasing_ghosts,
)
from ._handles import AsyncFile
from ._threads import caller_cancelled

__all__ = (
    "Acquisition",
    "FileArgument",
    "describe",
    "flush_and_unlock",
    "lock_error",
    "release_file",
    "try_lock",
    "undo_try_lock",
)


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


#: What `lock` and `unlock` accept: an aiofiles handle, a file object, or an fd.
FileArgument = AsyncFile | IO[Any] | _HasFileno | int


def describe(file: object) -> tuple[int, str]:
    """The fd behind ``file`` and a name for it in messages (no I/O)."""
    if isinstance(file, int):
        if file < 0:
            raise ValueError(f"cannot lock fd {file}: file descriptors are >= 0")
        return file, f"fd {file}"
    name = getattr(file, "name", None)
    label = repr(name) if name is not None else repr(file)
    try:
        fd = file.fileno()  # type: ignore[attr-defined]
    except (ValueError, OSError) as exc:
        raise LockException(
            f"cannot lock {label}: the file is closed; lock an open file",
            path=name if isinstance(name, str) else None,
        ) from exc
    except AttributeError:
        raise TypeError(
            f"cannot lock {file!r}: pass an aiofiles handle, a file object or an fd"
        ) from None
    return int(fd), label


def lock_error(exc: OSError, label: str, path: str | None) -> LockException:
    """The library's error for a failed ``flock`` on ``label``."""
    if exc.errno in WOULD_BLOCK:
        return AlreadyLocked(f"{label} is locked by another holder", path=path)
    if exc.errno == errno.EBADF:
        return LockException(f"cannot lock {label}: it is not an open file descriptor", path=path)
    return LockException(f"cannot lock {label}: {exc.strerror}", path=path)


# --------------------------------------------------------------------------
# lock() / unlock()


def try_lock(fd: int, kind: int, wait: bool) -> OSError | Waiter | None:
    """`lock`'s one hop: try; if the file is held elsewhere and the caller
    waits, prepare the waiting thread's descriptors (`_flock.moving_waiter`:
    the caller keeps ``fd``, so the thread must not share its description)."""
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in WOULD_BLOCK or not wait:
            return exc
    else:
        return None
    return moving_waiter(fd, kind)


def undo_try_lock(outcome: OSError | Waiter | None, fd: int) -> None:
    """The task that called `lock` was cancelled: it takes nothing."""
    if outcome is None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    elif isinstance(outcome, Waiter):  # never started: close what it would own
        outcome.close_unstarted()


def flush_and_unlock(flush: Callable[[], object] | None, fd: int) -> None:
    """`unlock`'s one hop: flush the caller's buffer (so the next holder sees
    it), then unlock, waiting out this process's ghosts of the file."""
    try:
        if flush is not None:
            flush()
    finally:
        unlock_releasing_ghosts(fd)  # see `_flock.Waiter`


# --------------------------------------------------------------------------
# Lock


class Acquisition:
    """The file a `Lock` opened for one acquire, and whether it got the lock.

    Filled in by a worker thread.  Nobody but this acquisition (and its
    waiting thread, which blocks on a ``dup``) ever uses the file's open
    description, so closing the file gives back the lock it may hold.
    """

    __slots__ = ("dup", "file", "key", "locked", "truncated")

    def __init__(self) -> None:
        self.file: IO[Any] | None = None
        self.dup: int | None = None  # for the waiting thread, which then owns it
        self.key: tuple[int, int] = (0, 0)
        self.locked = False
        self.truncated = False

    def open_and_try(self, filename: str, mode: str, kind: int, truncate: bool, fail: bool) -> None:
        """The acquire's one hop: open, try, and truncate if locked (mode "w")."""
        # O_CREAT without O_TRUNC: mode "w" was mapped to "a", and truncation
        # waits until the lock is held.
        file = open(filename, mode)  # noqa: SIM115 - ownership passes to the Lock
        try:
            fd = file.fileno()
            self.key = file_key(fd)
            try:
                fcntl.flock(fd, kind | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in WOULD_BLOCK:
                    raise
                if fail:
                    file.close()  # fail_when_locked: nothing to keep
                    return
                self.dup = os.dup(fd)
            else:
                self.locked = True
                if truncate and not caller_cancelled():
                    file.truncate(0)
                    self.truncated = True
        except BaseException:
            file.close()
            raise
        self.file = file

    def undo(self, _: None) -> None:
        """The acquiring task is gone (in a worker thread): close, unless the
        file was truncated already; then the handle is handed over (module
        docstring)."""
        if not self.truncated:
            self.discard()

    def truncate(self, fd: int) -> None:
        """Mode "w", in the waiting thread once the lock is granted."""
        os.ftruncate(fd, 0)
        self.truncated = True

    def discard(self) -> None:
        """Close what this acquisition opened (in a worker thread)."""
        dup, self.dup = self.dup, None
        file, self.file = self.file, None
        self.locked = False
        try:
            close_quietly(dup)
        finally:
            if file is not None:
                file.close()  # nothing was written: this only closes the fd


def release_file(file: io.IOBase) -> None:
    """`Lock.release`'s one hop: flush what was written (so the next holder
    sees it; no syscall if nothing was), unlock, close, and wait out this
    process's ghosts of the file."""
    try:
        file.flush()
    finally:
        try:
            unlock_releasing_ghosts(file.fileno())
        finally:
            file.close()
