"""The one way atempstore runs blocking work: a single hop to a worker thread.

Every public coroutine gathers its whole syscall sequence into one function and
hands it to :func:`run_sync`, so a public operation costs one thread hop, not
one per syscall.  Two kinds of thread keep the kinds of work apart:

* file work (open, write, fsync, rename, ...) runs on the library's own pool of
  `POOL_THREADS` threads (optionally further limited by an anyio
  `CapacityLimiter`, as the cache does for its readers);
* a thread that sits in a blocking ``flock`` until another process lets go
  runs through :func:`run_wait` on a daemon thread of its own.  Such a wait
  can last forever, so it must never occupy a pool thread that file work
  needs (a write stalled behind 100 waiting lock tasks is the bug this
  prevents), nor keep the interpreter from exiting after the task gave up.

Why not ``anyio.to_thread.run_sync``, as SPEC.md first said: a hop through it
costs about 90-110 µs here against 55-75 µs for a plain executor hop (its
limiter adds a loop iteration and its worker bookkeeping runs on every call),
and the hop *is* most of the cost of an uncontended lock or a small durable
write.  atempstore is asyncio-native throughout, so anyio's portability buys
nothing, while its cancellation semantics are kept (and extended to plain
``task.cancel()``) by `_Hop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from anyio import CapacityLimiter
from typing_extensions import TypeVarTuple, Unpack

__all__ = ("POOL_THREADS", "run_sync", "run_wait")

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

#: Worker threads for file operations, per process.
POOL_THREADS = 32

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    pool = _pool
    if pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="atempstore")
            pool = _pool
    return pool


def _forget_pool_after_fork() -> None:
    # A forked child inherits the pool's bookkeeping but none of its threads:
    # work submitted there would wait forever.  Start afresh.
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_after_fork)


class _Hop:
    """A call handed to a worker thread that the caller can wait out.

    Cancelling an ``await`` of an executor future does not stop the thread,
    which runs on: the caller would roll back (close a file, say) *before* the thread
    finished opening it, and the file would leak.  So the caller, when
    interrupted, waits here until the call has really finished (or learns it
    never started), and only then lets the cancellation through.

    A result the interrupted caller will never see (a claimed message, an
    opened file) is handed to ``undo``: by the worker thread itself when the
    caller gave up while the call ran, else by the caller (see `run_sync`).
    """

    __slots__ = ("_args", "_func", "_loop", "_mutex", "_state", "_undo", "_waiter", "result")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        func: Callable[..., object],
        args: tuple[object, ...],
        undo: Callable[[Any], object] | None,
    ) -> None:
        self._loop = loop
        self._func = func
        self._args = args
        self._undo = undo
        self._mutex = threading.Lock()
        # "pending" -> "running" -> "finished" (or "failed"), or "pending" -> "dropped"
        self._state = "pending"
        self._waiter: asyncio.Future[None] | None = None
        self.result: object = None

    def __call__(self) -> object:
        with self._mutex:
            if self._state == "dropped":
                return None
            self._state = "running"
        outcome = "failed"
        try:
            self.result = self._func(*self._args)
            outcome = "finished"
            return self.result
        finally:
            with self._mutex:
                self._state = outcome
                waiter = self._waiter
            if waiter is not None:
                if outcome == "finished" and self._undo is not None:
                    self._undo(self.result)  # the caller is gone: nobody else will
                with contextlib.suppress(RuntimeError):  # loop closed: nobody waits
                    self._loop.call_soon_threadsafe(_wake, waiter)

    async def wait_out(self) -> bool:
        """Return once the call has ended or can no longer start; True if it
        finished before the caller gave up, so its result is the caller's to undo."""
        with self._mutex:
            if self._state == "pending":
                self._state = "dropped"
                return False
            if self._state != "running":
                return self._state == "finished"
            waiter = self._waiter = self._loop.create_future()
        await _shielded(waiter)
        return False


async def _shielded(future: asyncio.Future[Any]) -> None:
    """Wait for ``future`` to complete, whatever cancellations arrive meanwhile."""
    while not future.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(future)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def run_sync(
    func: Callable[[Unpack[Ts]], T],
    *args: Unpack[Ts],
    abandon_on_cancel: bool = False,
    limiter: CapacityLimiter | None = None,
    undo: Callable[[T], object] | None = None,
) -> T:
    """Run ``func(*args)`` in a worker thread and return its result.

    Calls that change state must finish or roll back, so by default a
    cancellation is delivered only once ``func`` has returned (or if it never
    started).  If the call finished but the cancelled caller will never see its
    result, ``undo(result)`` runs in a worker thread before the cancellation
    goes on (give back a claim, close a file).  Only read-only work may pass
    ``abandon_on_cancel=True``.  ``limiter`` caps how many calls sharing it run
    at once.  The caller's context variables are visible to ``func``.
    """
    if limiter is not None:
        async with limiter:
            return await run_sync(func, *args, abandon_on_cancel=abandon_on_cancel, undo=undo)
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    if abandon_on_cancel:
        return await loop.run_in_executor(_get_pool(), context.run, func, *args)
    hop = _Hop(loop, func, args, undo)
    try:
        result = await loop.run_in_executor(_get_pool(), context.run, hop)
    except BaseException:
        if await hop.wait_out() and undo is not None:
            await _shielded(_start_thread(loop, undo, hop.result))
        raise
    return result  # type: ignore[return-value]


def _start_thread(
    loop: asyncio.AbstractEventLoop, func: Callable[..., object], *args: object
) -> asyncio.Future[None]:
    """Start ``func(*args)`` on a daemon thread *now* (no await before it runs);
    the future completes when it returns.  For work that must happen even while
    the task is being cancelled."""
    done: asyncio.Future[None] = loop.create_future()

    def work() -> None:
        try:
            func(*args)
        finally:
            with contextlib.suppress(RuntimeError):  # loop closed: nobody waits
                loop.call_soon_threadsafe(_wake, done)

    threading.Thread(target=work, name="atempstore rollback", daemon=True).start()
    return done


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
