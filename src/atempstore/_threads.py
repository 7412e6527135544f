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


async def run_sync(
    func: Callable[[Unpack[Ts]], T],
    *args: Unpack[Ts],
    abandon_on_cancel: bool = False,
    limiter: CapacityLimiter | None = None,
) -> T:
    """Run ``func(*args)`` in a worker thread and return its result.

    Calls that change state must finish or roll back, so by default a
    cancellation waits for ``func`` to return before it is delivered.  Only
    read-only work may pass ``abandon_on_cancel=True``.
    """
    return await anyio.to_thread.run_sync(
        func,
        *args,
        abandon_on_cancel=abandon_on_cancel,
        limiter=limiter if limiter is not None else file_limiter(),
    )


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
