"""Inter-process file locks: the portalocker-compatible async API.

Owns the public names of SPEC §1 (the flags, `lock`, `unlock`, `Lock`) and
what a cancellation or a timeout means for each of them.  The lock itself is
`_flock`'s (the primitive every component waits on: the try, the waiting
thread, its ghosts, the turnstile); what each hop does in its worker thread
is `_lockcore`'s; `open_atomic`, the last name of §1, lives with the durable
primitives in `_atomic` (it takes no lock).  A second lock backend
(``RedisLock``, SPEC §10) reuses the facade's ideas: a per-object FIFO mutex
in front of the backend, a deadline rather than a poll (`_remaining`), and a
result that must be handed over despite a cancellation
(`_defer_cancellation`).

Never on the loop.  Every syscall on a lock file or a user's descriptor
(``open``, ``fstat``, ``flock``, ``ftruncate``, ``close``) runs in a worker
thread, one hop per public operation: `Lock.acquire` opens, tries and (mode
``"w"``) truncates in one hop; `Lock.release` and `unlock` flush, unlock,
close and wait out this process's given-up waiters in one hop; the waiting
thread closes its own descriptors.  On NFS each of those calls is a round trip
that may hang, which must never stall the event loop.

Mode ``"w"`` truncates only when `Lock.acquire` returns the handle.  A
truncation cannot be undone, so it runs in the worker thread in the same call
as the grant (the open-and-try hop, or the waiting thread once the kernel
grants the lock), and only while the task still waits: the hop skips it if
its caller was cancelled meanwhile (`caller_cancelled`), and the waiting
thread commits to the grant under a mutex that the task's cancellation takes
too.  A cancellation that arrives once the truncation has started (the call
is in flight, or its result is on its way to the task) is *deferred*: the
acquire returns the handle after all and the task is cancelled again on the
next turn of the loop, so its next ``await`` raises (`_defer_cancellation`);
a task that ends with the acquire keeps the handle.  A timeout that fires then
is not raised: the lock was acquired.  Without truncation there is nothing
irreversible: a grant that races with a cancellation is given back.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
from types import TracebackType
from typing import IO, Any, Generic, Literal, TypeVar, overload

import anyio
import portalocker
from aiofiles.threadpool.binary import AsyncBufferedIOBase
from aiofiles.threadpool.text import AsyncTextIOWrapper

from ._errors import AlreadyLocked, LockException, LockTimeout
from ._flock import Waiter, await_grant, await_grant_for, turnstile
from ._handles import AsyncFile, underlying
from ._lockcore import (
    Acquisition,
    FileArgument,
    describe,
    flush_and_unlock,
    lock_error,
    release_file,
    try_lock,
    undo_try_lock,
)
from ._threads import run_sync

__all__ = ("LOCK_EX", "LOCK_NB", "LOCK_SH", "LOCK_UN", "Lock", "lock", "unlock")

#: Exclusive lock: one holder at a time.
LOCK_EX = portalocker.LockFlags.EXCLUSIVE
#: Shared lock: many holders, none exclusive.
LOCK_SH = portalocker.LockFlags.SHARED
#: Do not block a thread waiting; with `Lock` it selects the timed, event-driven wait.
LOCK_NB = portalocker.LockFlags.NON_BLOCKING
#: Unlock.
LOCK_UN = portalocker.LockFlags.UNBLOCK


def _lock_kind(flags: int) -> int:
    """Validate ``flags`` and return LOCK_EX or LOCK_SH."""
    kind = int(flags) & (LOCK_EX | LOCK_SH)
    if kind not in (LOCK_EX, LOCK_SH) or int(flags) & LOCK_UN:
        raise ValueError(
            f"invalid lock flags {flags!r}: use LOCK_EX or LOCK_SH, optionally with LOCK_NB"
        )
    return kind


def _defer_cancellation() -> None:
    """A CancelledError was caught but a result must be returned (a committed
    mode-"w" grant, see the module docstring): cancel the task again on the
    next turn of the loop, so that its next ``await`` raises it.  Not at once:
    a task whose coroutine is the acquire itself (``create_task(acquire())``,
    ``wait_for``) would then end cancelled and its result, the handle, would
    be lost; a task that is done by the next turn keeps its result."""
    task = asyncio.current_task()
    if task is None:  # pragma: no cover - always inside a task
        return
    uncancel = getattr(task, "uncancel", None)  # 3.11+: the count stays as it was
    if uncancel is not None:
        uncancel()
    task.get_loop().call_soon(_cancel_if_running, task)


def _cancel_if_running(task: asyncio.Task[Any]) -> None:
    if not task.done():
        task.cancel()


# --------------------------------------------------------------------------
# lock() / unlock()


async def lock(file: FileArgument, flags: int) -> None:
    """Lock ``file`` (an aiofiles handle, a file object or an fd) with ``flags``.

    With `LOCK_NB` a lock held elsewhere raises `AlreadyLocked` at once;
    without it the call waits, event-driven, for as long as it takes.  If the
    task is cancelled (or a timeout around the call fires), ``file`` is left
    unlocked, and no lock is taken on it once the other holder lets go:
    calling `lock` again on the same file at once is fine.

    Example:
        ```python
        async with aiofiles.open("state.json", "a+") as fh:
            await lock(fh, LOCK_EX)
            try:
                ...  # read, modify, write
            finally:
                await unlock(fh)
        ```
    """
    kind = _lock_kind(flags)
    fd, label = describe(file)
    path = getattr(file, "name", None)
    path = path if isinstance(path, str) else None
    wait = not int(flags) & LOCK_NB

    outcome = await run_sync(try_lock, fd, kind, wait, undo=lambda made: undo_try_lock(made, fd))
    if isinstance(outcome, Waiter):
        outcome = await await_grant_for(fd, outcome)
    if outcome is not None:
        raise lock_error(outcome, label, path) from outcome


async def unlock(file: FileArgument) -> None:
    """Release a lock taken with `lock` (or by anyone through the same open file).

    Buffered data written through ``file`` is flushed first, so the next
    holder sees it.  The unlock happens even if the task is cancelled
    meanwhile (the cancellation is delivered once it is done).

    Example:
        ```python
        await lock(fh, LOCK_EX | LOCK_NB)
        await fh.write("mine")
        await unlock(fh)
        ```
    """
    fd, label = describe(file)
    sync_file = underlying(file) if hasattr(file, "_file") else file  # type: ignore[arg-type]
    flush = getattr(sync_file, "flush", None)
    try:
        await run_sync(flush_and_unlock, flush, fd, shield=True)
    except OSError as exc:
        raise LockException(f"cannot unlock {label}: {exc.strerror}", path=None) from exc


# --------------------------------------------------------------------------
# Lock


def _wrap_locked(file: IO[Any]) -> AsyncFile:
    sync_file: Any = file  # the stubs want TextIO/BinaryIO; io classes are those at runtime
    text = isinstance(sync_file, io.TextIOBase)  # (a bool: mypy narrows Any to the stub-less class)
    if text:
        return AsyncTextIOWrapper(sync_file, loop=None, executor=None)
    return AsyncBufferedIOBase(sync_file, loop=None, executor=None)


#: Open modes that give a text handle (`Lock` mode ``"w"`` opens as ``"a"``).
TextMode = Literal["a", "w", "r+", "a+", "w+", "at", "wt", "r+t", "a+t", "w+t"]
#: Open modes that give a binary handle.
BinaryMode = Literal["ab", "wb", "rb+", "r+b", "ab+", "a+b", "wb+", "w+b"]

H = TypeVar("H", AsyncTextIOWrapper, AsyncBufferedIOBase, Any)


class Lock(Generic[H]):
    """An inter-process lock on ``filename``, usable from many tasks and processes.

    The constructor only records its arguments.  `acquire` opens the file with
    ``mode`` and returns the open aiofiles handle once the lock is held.
    Mode ``"w"`` opens as ``"a"`` and truncates only when the lock is held and
    the handle is returned, so a waiter never wipes the holder's data.

    With `LOCK_NB` in ``flags`` (the default) `acquire` waits up to
    ``timeout`` seconds (`None`: forever) and raises `LockTimeout`; without
    it, it waits forever, as portalocker does.  ``fail_when_locked=True``
    raises `AlreadyLocked` at once instead of waiting.  ``check_interval`` is
    accepted for compatibility and ignored: waiting is event-driven.

    One `Lock` object may be shared by many tasks: they take turns, FIFO.
    Acquiring again from the task that holds it returns the same handle.

    Example:
        ```python
        async with Lock("/var/run/myjob.lock", timeout=10) as fh:
            await fh.write(f"{os.getpid()}\\n")
        ```
    """

    @overload
    def __init__(
        self: Lock[AsyncTextIOWrapper],
        filename: str | os.PathLike[str],
        mode: TextMode = "a",
        timeout: float | None = 5.0,
        check_interval: float = 0.25,
        fail_when_locked: bool = False,
        flags: int = LOCK_EX | LOCK_NB,
    ) -> None: ...

    @overload
    def __init__(
        self: Lock[AsyncBufferedIOBase],
        filename: str | os.PathLike[str],
        mode: BinaryMode,
        timeout: float | None = 5.0,
        check_interval: float = 0.25,
        fail_when_locked: bool = False,
        flags: int = LOCK_EX | LOCK_NB,
    ) -> None: ...

    @overload
    def __init__(
        self: Lock[Any],
        filename: str | os.PathLike[str],
        mode: str,
        timeout: float | None = 5.0,
        check_interval: float = 0.25,
        fail_when_locked: bool = False,
        flags: int = LOCK_EX | LOCK_NB,
    ) -> None: ...

    def __init__(
        self,
        filename: str | os.PathLike[str],
        mode: str = "a",
        timeout: float | None = 5.0,
        check_interval: float = 0.25,
        fail_when_locked: bool = False,
        flags: int = LOCK_EX | LOCK_NB,
    ) -> None:
        if not any(c in mode for c in "rwa") or "x" in mode:
            raise ValueError(f"invalid lock file mode {mode!r}: use 'a', 'w', 'r+' or the like")
        self.filename = os.fspath(filename)
        self.mode = mode
        self.timeout = timeout
        self.check_interval = check_interval
        self.fail_when_locked = fail_when_locked
        self.flags = flags
        self._kind = _lock_kind(flags)
        self._truncate = "w" in mode
        self._open_mode = mode.replace("w", "a")
        self._handle: H | None = None
        self._owner: asyncio.Task[Any] | None = None
        self._mutex: asyncio.Lock | None = None
        self._mutex_loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        state = "held" if self._handle is not None else "free"
        return f"<Lock {self.filename!r} {state}>"

    @property
    def held(self) -> bool:
        """Whether this object currently holds the lock."""
        return self._handle is not None

    def _object_mutex(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._mutex is None or self._mutex_loop is not loop:
            self._mutex, self._mutex_loop = asyncio.Lock(), loop
        return self._mutex

    async def acquire(
        self,
        timeout: float | None = None,  # noqa: ASYNC109 - portalocker's signature
        check_interval: float | None = None,
        fail_when_locked: bool | None = None,
    ) -> H:
        """Take the lock and return the open aiofiles handle.

        Raises `AlreadyLocked` (``fail_when_locked``) or `LockTimeout`.  If the
        task is cancelled, no lock is held and no file is left open.

        Example:
            ```python
            lock = Lock("job.lock", timeout=1)
            fh = await lock.acquire()
            try:
                await fh.write("working\\n")
            finally:
                await lock.release()
            ```
        """
        del check_interval  # accepted for compatibility; waiting is event-driven
        current = asyncio.current_task()
        if self._handle is not None and self._owner is current:
            return self._handle
        if timeout is None:
            timeout = self.timeout
        if not int(self.flags) & LOCK_NB:
            timeout = None  # blocking flags: wait as long as it takes, like portalocker
        fail = self.fail_when_locked if fail_when_locked is None else fail_when_locked
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)

        mutex = self._object_mutex()
        if mutex.locked():
            if fail:
                raise AlreadyLocked(
                    f"{self.filename!r} is held by another task through this Lock",
                    path=self.filename,
                )
            with anyio.move_on_after(_remaining(deadline)) as scope:
                await mutex.acquire()
            if scope.cancelled_caught:
                self._raise_timeout(timeout)
        else:
            await mutex.acquire()  # free: returns without suspending
        try:
            file = await self._acquire_file(deadline, timeout, fail)
        except BaseException:
            mutex.release()
            raise
        handle: H = _wrap_locked(file)  # type: ignore[assignment]  # H follows the mode
        self._handle = handle
        self._owner = current
        return handle

    async def _acquire_file(
        self, deadline: float | None, waited: float | None, fail: bool
    ) -> IO[Any]:
        attempt = Acquisition()
        try:
            await run_sync(
                attempt.open_and_try,
                self.filename,
                self._open_mode,
                self._kind,
                self._truncate,
                fail,
                undo=attempt.undo,
            )
            if not attempt.locked:
                if fail:
                    raise AlreadyLocked(
                        f"{self.filename!r} is locked by another holder", path=self.filename
                    )
                await self._wait(attempt, deadline, waited)
        except asyncio.CancelledError:
            if attempt.truncated:
                # Committed: the truncation cannot be undone, so the handle is
                # returned and the cancellation comes at the next await.
                _defer_cancellation()
                assert attempt.file is not None
                return attempt.file
            await self._discard(attempt)
            raise
        except BaseException:
            await self._discard(attempt)
            raise
        assert attempt.file is not None
        return attempt.file

    @staticmethod
    async def _discard(attempt: Acquisition) -> None:
        if attempt.file is not None or attempt.dup is not None:
            await run_sync(attempt.discard, shield=True)

    async def _wait(
        self, attempt: Acquisition, deadline: float | None, waited: float | None
    ) -> None:
        with anyio.move_on_after(_remaining(deadline)):
            async with turnstile(attempt.key):
                dup, attempt.dup = attempt.dup, None  # the thread owns it now
                assert dup is not None
                waiter = Waiter(
                    dup, self._kind, attempt.key, then=attempt.truncate if self._truncate else None
                )
                try:
                    await await_grant(waiter)
                finally:
                    attempt.locked = waiter.granted
                if waiter.error is not None:
                    error = waiter.error
                    raise lock_error(error, repr(self.filename), self.filename) from error
                return
        if attempt.locked:
            return  # granted as the timeout fired: acquired after all
        self._raise_timeout(waited)

    def _raise_timeout(self, timeout: float | None) -> None:
        raise LockTimeout(
            f"timed out after {timeout} s waiting for the lock on {self.filename!r};"
            " another holder still has it (raise the timeout or find the holder)",
            path=self.filename,
            timeout=timeout,
        )

    async def release(self) -> None:
        """Release the lock and close the handle; a second call does nothing.

        The release happens even if the task is cancelled meanwhile (the
        cancellation is delivered once it is done), so `held` is false when
        this returns or raises.

        Example:
            ```python
            fh = await lock.acquire()
            await lock.release()
            await lock.release()  # harmless
            ```
        """
        handle, self._handle = self._handle, None
        if handle is None:
            return
        self._owner = None
        file = underlying(handle)
        try:
            if not file.closed:  # else the user closed it: closing released the lock
                await run_sync(release_file, file, shield=True)
        finally:
            mutex = self._mutex
            if mutex is not None and mutex.locked():
                mutex.release()

    async def __aenter__(self) -> H:
        return await self.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.release()


def _remaining(deadline: float | None) -> float:
    if deadline is None:
        return float("inf")
    return max(deadline - time.monotonic(), 0.0)
