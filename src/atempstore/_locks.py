"""Inter-process file locks: the async counterpart of portalocker.

``flock`` locks belong to an *open file description*, not to a process, so
two tasks of one process that each open the lock file exclude each other, and
an unrelated ``open()``/``close()`` of the same file never drops a lock (the
trap of POSIX ``fcntl`` record locks).

Waiting is event-driven.  A task that finds the lock held hands a *blocking*
``flock`` to a daemon thread; the kernel wakes that thread the moment the
holder lets go, and the thread wakes the task with ``call_soon_threadsafe``.
There is no ``check_interval`` sleep in between, so a handoff costs tens of
microseconds instead of half a polling interval.  Within one event loop the
tasks waiting for the same file queue in FIFO order behind a per-file
turnstile, so only the head of the queue occupies a thread: a hundred waiting
tasks cost one blocked thread, not a hundred, and none of them holds a token
of the limiter that file operations use.

A cancelled or timed-out wait cannot interrupt the blocked ``flock``.  The
waiting thread works on its own ``dup`` of the descriptor, so the task closes
its file at once; if the thread is later granted the lock it releases it and
closes the ``dup`` (a lock nobody asked for anymore lives only between the
holder's release and that thread waking up).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import io
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import IO, Any, Generic, Literal, Protocol, TypeVar, overload

import anyio
import portalocker
from aiofiles.threadpool.binary import AsyncBufferedIOBase
from aiofiles.threadpool.text import AsyncTextIOWrapper

from ._durable import (
    create_exclusive,
    fsync_dir,
    publish_link,
    publish_replace,
    temp_name,
    unlink_quietly,
)
from ._errors import AlreadyLocked, LockException, LockTimeout
from ._handles import AsyncFile, underlying, wrap_file
from ._threads import run_sync, run_wait

__all__ = ("LOCK_EX", "LOCK_NB", "LOCK_SH", "LOCK_UN", "Lock", "lock", "open_atomic", "unlock")

#: Exclusive lock: one holder at a time.
LOCK_EX = portalocker.LockFlags.EXCLUSIVE
#: Shared lock: many holders, none exclusive.
LOCK_SH = portalocker.LockFlags.SHARED
#: Do not block a thread waiting; with `Lock` it selects the timed, event-driven wait.
LOCK_NB = portalocker.LockFlags.NON_BLOCKING
#: Unlock.
LOCK_UN = portalocker.LockFlags.UNBLOCK

_WOULD_BLOCK = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES})


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


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


#: What `lock` and `unlock` accept: an aiofiles handle, a file object, or an fd.
FileArgument = AsyncFile | IO[Any] | _HasFileno | int


# --------------------------------------------------------------------------
# Small pieces shared by lock() and Lock


def _describe(file: object) -> tuple[int, str]:
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


def _lock_kind(flags: int) -> int:
    """Validate ``flags`` and return LOCK_EX or LOCK_SH."""
    kind = int(flags) & (LOCK_EX | LOCK_SH)
    if kind not in (LOCK_EX, LOCK_SH) or int(flags) & LOCK_UN:
        raise ValueError(
            f"invalid lock flags {flags!r}: use LOCK_EX or LOCK_SH, optionally with LOCK_NB"
        )
    return kind


def _lock_error(exc: OSError, label: str, path: str | None) -> LockException:
    if exc.errno in _WOULD_BLOCK:
        return AlreadyLocked(f"{label} is locked by another holder", path=path)
    if exc.errno == errno.EBADF:
        return LockException(f"cannot lock {label}: it is not an open file descriptor", path=path)
    return LockException(f"cannot lock {label}: {exc.strerror}", path=path)


class _Waiter:
    """One blocking ``flock`` in a daemon thread that the task may walk away from.

    The thread owns ``fd`` (a ``dup`` made for it).  If the task is still
    waiting when the lock is granted, the task takes the result; if the task
    abandoned the wait, the thread releases the lock it got and closes ``fd``.
    A mutex makes "granted" and "abandoned" mutually exclusive.

    A blocked ``flock`` cannot be called off, so an abandoned waiter (a
    "ghost") still takes the lock for a moment once its holder lets go: until
    its thread gets the GIL back and unlocks.  Ghosts are registered by file
    (`_ghosts`) so that a release in this process can wait them out
    (`settle_ghosts`): when ``release()`` returns, the lock is free.
    """

    __slots__ = ("_fd", "_flags", "_mutex", "_state", "error", "gone", "key")

    def __init__(self, fd: int, flags: int) -> None:
        self._fd = fd
        self._flags = flags
        self._mutex = threading.Lock()
        self._state = "waiting"
        self.error: OSError | None = None
        self.key: tuple[int, int] = (0, 0)
        self.gone = threading.Event()

    def run(self) -> None:  # in the waiting thread
        try:
            fcntl.flock(self._fd, self._flags)
        except OSError as exc:
            self.error = exc
        with self._mutex:
            abandoned = self._state == "abandoned"
            self._state = "done"
        if abandoned:
            try:
                self._close()
            finally:
                _forget_ghost(self)

    def abandon(self) -> bool:
        """Give up the wait; True if the thread will clean up after itself."""
        key = _file_key(self._fd)  # an fd call: before the thread may close it
        with self._mutex:
            if self._state == "waiting":
                self._state = "abandoned"
                self.key = key
                with _ghosts_mutex:
                    _ghosts.setdefault(key, set()).add(self)
                return True
            return False

    def _close(self) -> None:
        if self.error is None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)

    def close(self) -> None:
        """Close the thread's ``dup``; the lock stays with the original fd."""
        os.close(self._fd)


# Abandoned waiters by (device, inode) of their file; see `_Waiter`.
_ghosts: dict[tuple[int, int], set[_Waiter]] = {}
_ghosts_mutex = threading.Lock()
#: How long a release waits for this process's ghosts of the file.  A ghost
#: that is still blocked after that lost the lock to another process.
GHOST_WAIT = 0.05


def _file_key(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


def _forget_ghost(waiter: _Waiter) -> None:
    with _ghosts_mutex:
        waiting = _ghosts.get(waiter.key)
        if waiting is not None:
            waiting.discard(waiter)
            if not waiting:
                del _ghosts[waiter.key]
    waiter.gone.set()


def _ghosts_of(fd: int) -> list[_Waiter]:
    """This process's ghosts waiting for ``fd``'s file (none: no syscall at all)."""
    if not _ghosts:
        return []
    key = _file_key(fd)
    with _ghosts_mutex:
        return list(_ghosts.get(key, ()))


def _wait_out_ghosts(ghosts: list[_Waiter]) -> None:
    deadline = time.monotonic() + GHOST_WAIT
    for ghost in ghosts:
        ghost.gone.wait(max(0.0, deadline - time.monotonic()))


async def settle_ghosts(ghosts: list[_Waiter]) -> None:
    """After an unlock: let this process's ghosts of the file take and drop
    the lock (they need the GIL, which a loop that never awaits would keep)."""
    if ghosts:
        await run_sync(_wait_out_ghosts, ghosts, abandon_on_cancel=True)


async def _wait_for_lock(fd: int, kind: int) -> OSError | None:
    """Block (off the loop) until ``fd``'s file can be locked with ``kind``.

    On success the lock is held through ``fd``.  On cancellation nothing is
    held through ``fd``'s open file description by this call once the holder
    lets go (see `_Waiter`); the caller still owns ``fd`` and closes it.
    """
    waiter = _Waiter(os.dup(fd), kind)
    try:
        await run_wait(waiter.run)
    except BaseException:
        if not waiter.abandon():
            # Granted just as we were cancelled: release through our dup.
            waiter._close()
        raise
    waiter.close()
    return waiter.error


# Tasks of one event loop waiting for the same file queue here, so that only
# the head of the queue occupies a thread.  Keyed by (device, inode).
_turnstiles: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, weakref.WeakValueDictionary[tuple[int, int], asyncio.Lock]
] = weakref.WeakKeyDictionary()


def _turnstile(key: tuple[int, int]) -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    per_loop = _turnstiles.get(loop)
    if per_loop is None:
        per_loop = _turnstiles[loop] = weakref.WeakValueDictionary()
    gate = per_loop.get(key)
    if gate is None:
        gate = per_loop[key] = asyncio.Lock()
    return gate


# --------------------------------------------------------------------------
# lock() / unlock()


async def lock(file: FileArgument, flags: int) -> None:
    """Lock ``file`` (an aiofiles handle, a file object or an fd) with ``flags``.

    With `LOCK_NB` a lock held elsewhere raises `AlreadyLocked` at once;
    without it the call waits, event-driven, for as long as it takes.  If the
    waiting task is cancelled, the wait is abandoned cleanly: no lock is taken
    on ``file`` once the other holder lets go.

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
    fd, label = _describe(file)
    path = getattr(file, "name", None)
    path = path if isinstance(path, str) else None

    def try_once() -> OSError | None:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
        except OSError as exc:
            return exc
        return None

    error = await run_sync(try_once)
    if error is not None and error.errno in _WOULD_BLOCK and not int(flags) & LOCK_NB:
        error = await _wait_for_lock(fd, kind)
    if error is not None:
        raise _lock_error(error, label, path) from error


async def unlock(file: FileArgument) -> None:
    """Release a lock taken with `lock` (or by anyone through the same open file).

    Buffered data written through ``file`` is flushed first, so the next
    holder sees it.

    Example:
        ```python
        await lock(fh, LOCK_EX | LOCK_NB)
        await fh.write("mine")
        await unlock(fh)
        ```
    """
    fd, label = _describe(file)
    sync_file = underlying(file) if hasattr(file, "_file") else file  # type: ignore[arg-type]
    flush = getattr(sync_file, "flush", None)

    def release() -> None:
        if flush is not None:
            flush()
        ghosts = _ghosts_of(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        _wait_out_ghosts(ghosts)  # see `_Waiter`

    try:
        await run_sync(release)
    except OSError as exc:
        raise LockException(f"cannot unlock {label}: {exc.strerror}", path=None) from exc


# --------------------------------------------------------------------------
# Lock


class _Acquisition:
    """The file a `Lock` opened for one acquire, and whether it got the lock.

    Filled in by a worker thread; if the acquiring task is cancelled, the
    task calls `discard` and nothing it opened or locked survives.
    """

    __slots__ = ("file", "key", "locked")

    def __init__(self) -> None:
        self.file: IO[Any] | None = None
        self.key: tuple[int, int] = (0, 0)
        self.locked = False

    def open_and_try(self, filename: str, mode: str, kind: int) -> None:
        # O_CREAT without O_TRUNC: mode "w" was mapped to "a", and truncation
        # waits until the lock is held and the handle is handed out.
        file = open(filename, mode)  # noqa: SIM115 - ownership passes to the Lock
        self.file = file
        st = os.fstat(file.fileno())
        self.key = (st.st_dev, st.st_ino)
        try:
            fcntl.flock(file.fileno(), kind | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in _WOULD_BLOCK:
                raise
        else:
            self.locked = True

    def discard(self) -> None:
        """Unlock and close what this acquisition opened (fd calls only)."""
        file, self.file = self.file, None
        if file is None:
            return
        if self.locked:
            fcntl.flock(file.fileno(), fcntl.LOCK_UN)
            self.locked = False
        # Nothing was written, so closing only closes the descriptor.
        file.close()


class _WriteTracking:
    """Marks the handle dirty on write, so release knows whether to flush.

    An unwritten handle is released without a thread hop (unlock and close
    are fd calls that never wait on the disk); a written one is flushed in a
    worker thread before it is unlocked, so the next holder sees the data.
    """

    _atempstore_dirty = False

    async def write(self, data: Any, /) -> int:
        self._atempstore_dirty = True
        written: int = await super().write(data)  # type: ignore[misc]
        return written

    async def writelines(self, lines: Any, /) -> None:
        self._atempstore_dirty = True
        await super().writelines(lines)  # type: ignore[misc]

    async def truncate(self, size: int | None = None, /) -> int:
        self._atempstore_dirty = True
        result: int = await super().truncate(size)  # type: ignore[misc]
        return result


class _LockedText(_WriteTracking, AsyncTextIOWrapper):
    pass


class _LockedBinary(_WriteTracking, AsyncBufferedIOBase):
    pass


def _wrap_locked(file: IO[Any]) -> AsyncFile:
    sync_file: Any = file  # the stubs want TextIO/BinaryIO; io classes are those at runtime
    if isinstance(sync_file, io.TextIOBase):
        return _LockedText(sync_file, loop=None, executor=None)  # type: ignore[arg-type]
    return _LockedBinary(sync_file, loop=None, executor=None)


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
        if self._truncate:
            # Here and not in the worker thread: from this line to the return
            # there is no await, so a cancelled or timed-out acquire can never
            # have truncated the file.  ftruncate is an fd call.
            file.truncate(0)
        handle: H = _wrap_locked(file)  # type: ignore[assignment]  # H follows the mode
        self._handle = handle
        self._owner = current
        return handle

    async def _acquire_file(
        self, deadline: float | None, waited: float | None, fail: bool
    ) -> IO[Any]:
        attempt = _Acquisition()
        try:
            await run_sync(attempt.open_and_try, self.filename, self._open_mode, self._kind)
            if not attempt.locked:
                if fail:
                    raise AlreadyLocked(
                        f"{self.filename!r} is locked by another holder", path=self.filename
                    )
                await self._wait(attempt, deadline, waited)
        except BaseException:
            attempt.discard()
            raise
        assert attempt.file is not None
        return attempt.file

    async def _wait(
        self, attempt: _Acquisition, deadline: float | None, waited: float | None
    ) -> None:
        assert attempt.file is not None
        fd = attempt.file.fileno()
        with anyio.move_on_after(_remaining(deadline)):
            async with _turnstile(attempt.key):
                error = await _wait_for_lock(fd, self._kind)
                if error is not None:
                    raise _lock_error(error, repr(self.filename), self.filename) from error
                attempt.locked = True
                return
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
            if file.closed:
                return  # the user closed it: closing released the lock
            ghosts = _ghosts_of(file.fileno())
            if getattr(handle, "_atempstore_dirty", False):
                await run_sync(_flush_unlock_close, file)
            else:
                # No pending data: unlock and close are fd calls that do not
                # wait on the disk, so the lock is handed over without a hop.
                fcntl.flock(file.fileno(), fcntl.LOCK_UN)
                file.close()
            await settle_ghosts(ghosts)
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


def _flush_unlock_close(file: io.IOBase) -> None:
    try:
        file.flush()
    finally:
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_UN)
        finally:
            file.close()


def _remaining(deadline: float | None) -> float:
    if deadline is None:
        return float("inf")
    return max(deadline - time.monotonic(), 0.0)


# --------------------------------------------------------------------------
# open_atomic


class _AtomicFile:
    """The temporary file behind one `open_atomic` block (blocking helpers)."""

    __slots__ = ("final", "tmp")

    def __init__(self, final: str) -> None:
        self.final = final
        self.tmp = ""

    def create(self, binary: bool, overwrite: bool) -> IO[Any]:
        # abspath may call getcwd(): resolve here, in the worker thread.
        self.final = os.path.abspath(self.final)
        self.tmp = temp_name(self.final)
        if not overwrite and os.path.lexists(self.final):
            raise FileExistsError(
                errno.EEXIST,
                "open_atomic will not replace an existing file (pass overwrite=True)",
                self.final,
            )
        fd = create_exclusive(self.tmp, 0o666)  # umask applies, like a plain open()
        return os.fdopen(fd, "wb" if binary else "w")

    def publish(self, file: IO[Any], overwrite: bool, durable: bool) -> None:
        try:
            try:
                file.flush()
                if durable:
                    os.fsync(file.fileno())
            finally:
                file.close()
            if overwrite:
                publish_replace(self.tmp, self.final)
            else:
                try:
                    publish_link(self.tmp, self.final)
                except FileExistsError as exc:
                    raise FileExistsError(
                        errno.EEXIST,
                        "open_atomic will not replace a file that appeared meanwhile"
                        " (pass overwrite=True)",
                        self.final,
                    ) from exc
        except BaseException:
            unlink_quietly(self.tmp)
            raise
        if durable:
            fsync_dir(os.path.dirname(self.final) or ".")

    def abort(self, file: IO[Any]) -> None:
        try:
            file.close()
        finally:
            unlink_quietly(self.tmp)


@overload
def open_atomic(
    filename: str | os.PathLike[str],
    binary: Literal[True] = ...,
    *,
    overwrite: bool = ...,
    durable: bool = ...,
) -> AbstractAsyncContextManager[AsyncBufferedIOBase]: ...


@overload
def open_atomic(
    filename: str | os.PathLike[str],
    binary: Literal[False],
    *,
    overwrite: bool = ...,
    durable: bool = ...,
) -> AbstractAsyncContextManager[AsyncTextIOWrapper]: ...


def open_atomic(
    filename: str | os.PathLike[str],
    binary: bool = True,
    *,
    overwrite: bool = False,
    durable: bool = True,
) -> AbstractAsyncContextManager[Any]:
    """Write a file that appears whole or not at all.

    Yields an aiofiles handle on a temporary file in the target's directory.
    On a clean exit the data is flushed and fsynced, the file is published
    (never replacing an existing target unless ``overwrite``; then atomically),
    and the directory is fsynced.  If the block raises, the temporary file is
    removed and the target is untouched.  ``durable=False`` skips both fsyncs.

    Example:
        ```python
        async with open_atomic("config.json", binary=False, overwrite=True) as fh:
            await fh.write(json.dumps(config))
        ```
    """
    return _open_atomic(os.fspath(filename), binary, overwrite, durable)


@asynccontextmanager
async def _open_atomic(
    final: str, binary: bool, overwrite: bool, durable: bool
) -> AsyncIterator[Any]:
    atomic = _AtomicFile(final)
    file = await run_sync(atomic.create, binary, overwrite)
    handle = wrap_file(file)
    try:
        yield handle
    except BaseException:
        await run_sync(atomic.abort, file)
        raise
    await run_sync(atomic.publish, file, overwrite, durable)
