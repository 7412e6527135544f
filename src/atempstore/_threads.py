"""The one way atempstore runs blocking work: a single hop to a worker thread.

Every public coroutine gathers its whole syscall sequence into one function and
hands it to :func:`run_sync`, so a public operation costs one thread hop, not
one per syscall.  Two kinds of thread keep the kinds of work apart:

* file work (open, write, fsync, rename, ...) runs on `_Pool`, the library's
  own pool of up to `POOL_THREADS` threads (optionally further limited by an
  anyio `CapacityLimiter`, as the cache does for its readers);
* slow work, which waits on something outside this host's disk (a
  `Source.pread` of a slow origin, a whole copy, a ledger lock held by another
  process), runs with ``slow=True`` on a second pool of its own, of at most
  `SLOW_THREADS` daemon threads.  Forty readers stuck on a source whose pread
  takes a second then occupy slow threads only, and an unrelated
  ``open_atomic`` still finds a file thread at once (SPEC.md, introduction).
  They are daemon threads because a hung source read must not keep the
  interpreter from exiting: what they were doing is never published;
* a thread that sits in a blocking ``flock`` until another process lets go
  runs through :func:`run_wait` on a daemon thread of its own.  Such a wait
  can last forever, so it must never occupy a pool thread that file work
  needs (a write stalled behind 100 waiting lock tasks is the bug this
  prevents), nor keep the interpreter from exiting after the task gave up.

Why not ``anyio.to_thread.run_sync``, as SPEC.md first said: a hop through it
costs about 90-110 µs here against 55-75 µs for a plain executor hop (its
limiter adds a loop iteration and its worker bookkeeping runs on every call),
and `_Pool` takes another 30-40 µs off that; the hop *is* most of the cost of
an uncontended lock or a small durable write.  atempstore is asyncio-native
throughout, so anyio's portability buys nothing, while its cancellation
semantics are kept (and extended to plain ``task.cancel()``) by `_Hop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import queue
import threading
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from anyio import CapacityLimiter
from typing_extensions import TypeVarTuple, Unpack

# Imported here, at import time, because otherwise they are imported lazily on
# the event loop, the first time a component is used: anyio loads its asyncio
# backend when the first limiter or event is created (15-20 ms of stat, read
# and module code on this project's VMs), and asyncio's default executor, which
# aiofiles handles use, imports concurrent.futures.thread when it is first
# created.  (tests/test_api.py::test_first_use_imports_nothing_on_the_event_loop)
import anyio._backends._asyncio  # noqa: F401  # isort: skip
import concurrent.futures.thread  # noqa: F401  # isort: skip

__all__ = ("POOL_THREADS", "SLOW_THREADS", "caller_cancelled", "run_sync", "run_wait")

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

#: Worker threads for file operations, per process.
POOL_THREADS = 32
#: Worker threads for slow work (source reads, copies, lock waits), per process.
SLOW_THREADS = 64


class _Pool:
    """Worker threads that hand each result straight back to the event loop.

    Not a `concurrent.futures.ThreadPoolExecutor`: ``run_in_executor`` chains a
    concurrent future to an asyncio one, and the worker then runs several
    Python callbacks and bookkeeping steps *after* it has woken the loop.  The
    woken loop thread needs the GIL the worker still holds, so it is put to
    sleep and woken a second time.  Here waking the loop is the worker's last
    act before it blocks for the next job, which takes ~30-40 µs off every hop
    on this project's 2-core VMs (``benchmarks/bench_session.py``).
    """

    def __init__(self, max_threads: int, *, daemon: bool = False, name: str = "atempstore") -> None:
        self._jobs: queue.SimpleQueue[_Hop | None] = queue.SimpleQueue()
        self._max_threads = max_threads
        self._daemon = daemon
        self._name = name
        self._threads = 0
        self._idle = 0  # threads that have finished a job and will take another
        # Jobs queued while every thread was busy and no more could start: the
        # next thread to finish takes one instead of counting itself idle
        # (else _idle would grow past the number of threads after every burst).
        self._backlog = 0
        self._count_lock = threading.Lock()
        self._closed = False
        _register_atexit(self._close)

    def submit(self, job: _Hop) -> None:
        with self._count_lock:
            if self._closed:
                raise RuntimeError("cannot start file work after interpreter shutdown")
            start = False
            if self._idle:
                self._idle -= 1
            elif self._threads < self._max_threads:
                self._threads += 1
                start = True
            else:
                self._backlog += 1
        self._jobs.put(job)
        if start:
            # The file pool is not daemon: work already handed over finishes
            # even at interpreter exit (``_close`` lets the threads go once the
            # queue is drained).  The slow pool is: see the module docstring.
            threading.Thread(target=self._work, name=self._name, daemon=self._daemon).start()

    def _work(self) -> None:
        get = self._jobs.get
        while (job := get()) is not None:
            deliver = job.run()
            del job
            with self._count_lock:
                if self._backlog:
                    self._backlog -= 1
                else:
                    self._idle += 1
            if deliver is not None:
                deliver()  # wakes the loop: nothing after it but blocking in get()
            del deliver

    def _close(self) -> None:
        with self._count_lock:
            self._closed = True
            threads = self._threads
        for _ in range(threads):
            self._jobs.put(None)


# concurrent.futures' own hook: runs at interpreter exit *before* non-daemon
# threads are joined, so the workers can be told to stop.  Absent elsewhere
# than CPython; daemon-like behaviour (no drain) is the fallback.
_register_atexit: Callable[[Callable[[], object]], None] = getattr(
    threading, "_register_atexit", lambda func: None
)

# The file pool (False) and the slow pool (True), each started on first use.
_pools: dict[bool, _Pool] = {}
_pool_lock = threading.Lock()


def _get_pool(slow: bool = False) -> _Pool:
    pool = _pools.get(slow)
    if pool is None:
        with _pool_lock:
            pool = _pools.get(slow)
            if pool is None:
                if slow:
                    pool = _Pool(SLOW_THREADS, daemon=True, name="atempstore slow")
                else:
                    pool = _Pool(POOL_THREADS)
                _pools[slow] = pool
    return pool


def _forget_pool_after_fork() -> None:
    # A forked child inherits the pools' bookkeeping but none of their
    # threads: work submitted there would wait forever.  Start afresh.
    global _pool_lock
    _pools.clear()
    _pool_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_after_fork)


class _Hop:
    """A call handed to a worker thread that the caller can wait out.

    A worker thread cannot be stopped, so a caller cancelled while its call
    runs would roll back (close a file, say) *before* the thread finished
    opening it, and the file would leak.  So the caller, when interrupted,
    waits here until the call has really finished (or learns it never
    started), and only then lets the cancellation through.

    A result the interrupted caller will never see (a claimed message, an
    opened file) is handed to ``undo``: by the worker thread itself when the
    caller gave up while the call ran, else by the caller (see `run_sync`).
    """

    __slots__ = (
        "_args",
        "_context",
        "_func",
        "_future",
        "_loop",
        "_mutex",
        "_report",
        "_state",
        "_undo",
        "_waiter",
        "result",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
        func: Callable[..., object],
        args: tuple[object, ...],
        undo: Callable[[Any], object] | None,
        report: bool = False,
    ) -> None:
        self._loop = loop
        # Report an error the cancelled caller will not see (shielded calls).
        self._report = report
        self._future = future
        self._context = contextvars.copy_context()
        self._func = func
        self._args = args
        self._undo = undo
        self._mutex = threading.Lock()
        # "pending" -> "running" -> "finished" (or "failed"), or "pending" -> "dropped"
        self._state = "pending"
        self._waiter: asyncio.Future[None] | None = None
        self.result: object = None

    def run(self) -> Callable[[], None] | None:
        """Run the call (in a worker thread); return what wakes the caller."""
        with self._mutex:
            if self._state == "dropped":
                return None
            self._state = "running"
        error: BaseException | None = None
        _running.hop = self
        try:
            self.result = self._context.run(self._func, *self._args)
        except BaseException as exc:
            error = exc
        finally:
            _running.hop = None
        with self._mutex:
            self._state = "failed" if error is not None else "finished"
            waiter = self._waiter
        if waiter is None:
            # The wake-up refers to neither this hop (and so the call and its
            # arguments) nor, once the loop has taken it, the outcome: the
            # worker may run on late after waking the loop, and a caller that
            # drops an object right after its await must see it finalized
            # (a FileStore whose lock fd then closes, say).
            outcome = [self._future, self.result, error]
            return partial(_call_soon, self._loop, _settle, outcome)
        if error is not None and self._report and isinstance(error, Exception):
            # A call that had to happen (a release, a roll-back) failed after
            # its caller was cancelled: the caller raises CancelledError, so
            # the error would be lost without this.
            report = {"message": "atempstore: a call its caller could not wait for failed"}
            _call_soon(
                self._loop, self._loop.call_exception_handler, {**report, "exception": error}
            )
        if error is None and self._undo is not None:
            try:
                self._undo(self.result)  # the caller is gone: nobody else will
            except Exception as exc:
                # Nobody is left to raise it to: report it the way asyncio
                # reports an exception no task retrieved, and still wake the
                # caller, which waits for this call to end.
                report = {"message": "atempstore: rolling back a cancelled call failed"}
                _call_soon(
                    self._loop, self._loop.call_exception_handler, {**report, "exception": exc}
                )
        return partial(_call_soon, self._loop, _wake, waiter)

    def drop(self) -> None:
        """Keep the call from starting if it has not started yet."""
        with self._mutex:
            if self._state == "pending":
                self._state = "dropped"

    async def wait_out(self, shield: bool = False) -> bool:
        """Return once the call has ended or can no longer start; True if it
        finished before the caller gave up, so its result is the caller's to undo.

        With ``shield`` a call that has not started yet is not dropped: it is
        waited for like a running one."""
        with self._mutex:
            if self._state == "pending" and not shield:
                self._state = "dropped"
                return False
            if self._state not in ("running", "pending"):
                return self._state == "finished"
            waiter = self._waiter = self._loop.create_future()
        await _shielded(waiter)
        return False


# The hop a worker thread is running, for `caller_cancelled`.
_running = threading.local()


def caller_cancelled() -> bool:
    """In a call made through `run_sync`: has its caller been cancelled meanwhile?

    The caller then waits for the call to end and will not see its result, so
    a call about to do something that cannot be undone (truncate a file)
    checks this first and skips it.  Outside such a call: False.
    """
    hop: _Hop | None = getattr(_running, "hop", None)
    if hop is None:
        return False
    with hop._mutex:
        return hop._waiter is not None


def _call_soon(
    loop: asyncio.AbstractEventLoop, callback: Callable[..., object], *args: object
) -> None:
    with contextlib.suppress(RuntimeError):  # loop closed: nobody waits
        loop.call_soon_threadsafe(callback, *args)


def _settle(outcome: list[Any]) -> None:
    """On the loop: hand ``[future, result, error]`` over, emptying the list."""
    future, result, error = outcome
    outcome.clear()
    if future.done():  # the caller was cancelled meanwhile
        return
    if error is None:
        future.set_result(result)
    elif isinstance(error, StopIteration):
        # A future cannot carry StopIteration (it would end the awaiting coroutine).
        future.set_exception(RuntimeError(f"{error!r} raised in a worker thread"))
    else:
        future.set_exception(error)


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
    slow: bool = False,
    shield: bool = False,
) -> T:
    """Run ``func(*args)`` in a worker thread and return its result.

    Calls that change state must finish or roll back, so by default a
    cancellation is delivered only once ``func`` has returned (or if it never
    started).  If the call finished but the cancelled caller will never see its
    result, ``undo(result)`` runs in a worker thread before the cancellation
    goes on (give back a claim, close a file).  Only read-only work may pass
    ``abandon_on_cancel=True``.  ``limiter`` caps how many calls sharing it run
    at once.  ``slow=True`` runs it on the slow pool (work that waits on a
    source, a copy or another process), never on a thread file work needs.
    ``shield=True`` is for calls that must happen once asked for (a release,
    a roll-back): a cancellation that arrives before the worker has started
    the call does not drop it; it is delivered once the call has returned.
    The caller's context variables are visible to ``func``.
    """
    if limiter is not None:
        async with limiter:
            return await run_sync(
                func,
                *args,
                abandon_on_cancel=abandon_on_cancel,
                undo=undo,
                slow=slow,
                shield=shield,
            )
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    hop = _Hop(loop, future, func, args, undo, report=shield)
    _get_pool(slow).submit(hop)
    try:
        return await future
    except BaseException:
        if abandon_on_cancel:
            hop.drop()
        elif await hop.wait_out(shield) and undo is not None:
            await _shielded(_start_thread(loop, undo, hop.result))
        raise


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
    the caller gave up (see ``_flock.Waiter``).  The result is delivered with
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
