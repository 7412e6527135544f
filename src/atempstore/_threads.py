"""The one way atempstore runs blocking work: a single hop to a worker thread.

Every public coroutine gathers its whole syscall sequence into one function and
hands it to :func:`run_sync`, so a public operation costs one thread hop, not
one per syscall.  Two capacity limiters keep the kinds of work apart:

* file work (open, write, fsync, rename, ...) runs through anyio with the
  library's own :func:`file_limiter`;
* a thread that sits in a blocking ``flock`` until another process lets go
  runs through :func:`run_wait` on a daemon thread of its own.  Such a wait
  can last forever, so it must neither hold a token that file work needs (a
  write stalled behind 100 waiting lock tasks is the bug this prevents) nor be
  an anyio worker, which is not a daemon and would keep the interpreter from
  exiting after the waiting task gave up.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import Callable
from typing import TypeVar

import anyio.to_thread
from anyio import CapacityLimiter
from typing_extensions import TypeVarTuple, Unpack

__all__ = ("FILE_THREADS", "file_limiter", "run_sync", "run_wait")

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

#: Threads that file operations may use at once, per event loop.
FILE_THREADS = 32
# A CapacityLimiter belongs to the event loop it is used in; tests and scripts
# run several loops one after another, so keep one per loop.
_limiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, CapacityLimiter] = (
    weakref.WeakKeyDictionary()
)


def file_limiter() -> CapacityLimiter:
    """The limiter shared by all of atempstore's file operations in this loop."""
    loop = asyncio.get_running_loop()
    limiter = _limiters.get(loop)
    if limiter is None:
        limiter = _limiters[loop] = CapacityLimiter(FILE_THREADS)
    return limiter


class _Hop:
    """A call handed to a worker thread that the caller can wait out.

    anyio shields a non-abandoning ``run_sync`` from anyio cancel scopes, but a
    plain ``task.cancel()`` still interrupts the ``await`` while the thread
    runs on: the caller would roll back (close a file, say) *before* the thread
    finished opening it, and the file would leak.  So the caller, when
    interrupted, waits here until the call has really finished (or learns it
    never started), and only then lets the cancellation through.
    """

    __slots__ = ("_args", "_func", "_loop", "_mutex", "_state", "_waiter")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, func: Callable[..., T], args: tuple[object, ...]
    ) -> None:
        self._loop = loop
        self._func = func
        self._args = args
        self._mutex = threading.Lock()
        self._state = "pending"  # -> "running" -> "finished", or "pending" -> "dropped"
        self._waiter: asyncio.Future[None] | None = None

    def __call__(self) -> object:
        with self._mutex:
            if self._state == "dropped":
                return None
            self._state = "running"
        try:
            return self._func(*self._args)
        finally:
            with self._mutex:
                self._state = "finished"
                waiter = self._waiter
            if waiter is not None:
                with contextlib.suppress(RuntimeError):  # loop closed: nobody waits
                    self._loop.call_soon_threadsafe(_wake, waiter)

    async def wait_out(self) -> None:
        """Return once the call has finished or can no longer start."""
        with self._mutex:
            if self._state == "pending":
                self._state = "dropped"
                return
            if self._state == "finished":
                return
            waiter = self._waiter = self._loop.create_future()
        while not waiter.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(waiter)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def run_sync(
    func: Callable[[Unpack[Ts]], T],
    *args: Unpack[Ts],
    abandon_on_cancel: bool = False,
    limiter: CapacityLimiter | None = None,
) -> T:
    """Run ``func(*args)`` in a worker thread and return its result.

    Calls that change state must finish or roll back, so by default a
    cancellation is delivered only once ``func`` has returned (or if it never
    started).  Only read-only work may pass ``abandon_on_cancel=True``.
    """
    if limiter is None:
        limiter = file_limiter()
    if abandon_on_cancel:
        return await anyio.to_thread.run_sync(func, *args, abandon_on_cancel=True, limiter=limiter)
    hop = _Hop(asyncio.get_running_loop(), func, args)
    try:
        result = await anyio.to_thread.run_sync(hop, limiter=limiter)
    except BaseException:
        await hop.wait_out()
        raise
    return result  # type: ignore[return-value]


async def run_wait(func: Callable[[], T]) -> T:
    """Run a call that blocks until *another* party acts, on a daemon thread.

    The task can be cancelled at any time; the thread then runs on and its
    result is dropped, so ``func`` itself must clean up what it obtained after
    the caller gave up (see ``_locks._Waiter``).  The result is delivered with
    ``call_soon_threadsafe``: the waiting task wakes as soon as ``func``
    returns, with no polling interval in between.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(result: T | None, error: BaseException | None) -> None:
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result = func()
        except BaseException as exc:
            outcome: tuple[T | None, BaseException | None] = (None, exc)
        else:
            outcome = (result, None)
        # A closed loop raises RuntimeError: nobody is waiting for this any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(deliver, *outcome)

    threading.Thread(target=work, name="atempstore lock wait", daemon=True).start()
    return await future
