"""The per-source `CopySession`: what every reader of one version of one source shares.

A `CopySession` lives on the event loop of one process (`_table` makes and
shares them; the `_copier` copies in a thread; `_filecache` is the public
face).  It is in one of four modes (`Mode`):

``"copy"``
    This process copies.  A worker thread copies the source into a *part* file
    in large chunks (``copy_file_range`` for a local path, ``pread`` + ``pwrite``
    for a `Source` object).  After each chunk it checks that the source still
    has the version it started with, and only then *publishes* the progress:
    to the readers of this process (an attribute the loop reads) and to other
    processes (a counter in the entry's lock file).  Bytes are never shown
    before they were checked, so a reader can never get a mix of two versions.
    The thread wakes the event loop only when a reader waits for the bytes it
    just published, and then through a `Doorbell`: every wake-up of the loop
    from a thread that goes straight back into a long kernel call can leave the
    loop thread stuck behind it on one CPU (see `Doorbell`).
``"follow"``
    Another process copies; this process reads the part file it is writing,
    up to the checked progress that copier publishes.  Progress wakes it
    through inotify (with a slow safety poll); the copier's end wakes it
    through the part file's own lock (see "the part file's lock" below).
``"cache"``
    The whole file is in the cache; reads are ``pread`` on the cached file.
``"source"``
    Uncached: the cache has no room, its disk failed, or the copy stopped.
    Reads go to the source directly, each one checked against the version.

In every mode a read of bytes that are not there yet waits for them if they
are at most ``wait_window`` bytes ahead of the copy, and is otherwise served
from the source at once (an HTTP Range request near the end of a large file
does not wait for the whole copy).

The part file's lock: the copier holds ``LOCK_EX`` on the part file while it
copies and converts it to ``LOCK_SH`` once the data is complete and fsynced,
just before it renames the file into place.  A follower waits for ``LOCK_SH``
on the same file in a daemon thread, so it wakes the moment the copier is done,
fails, or dies (the kernel drops a dead process's locks).  Every process that
reads a cached file holds ``LOCK_SH`` on it, which is how eviction, in any
process, knows that the file is in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Callable
from typing import Any

import anyio
from anyio import CapacityLimiter

from .._errors import SourceChangedError
from .._flock import wait_for_lock
from .._threads import run_sync
from ._copier import Copier
from ._fd import FdClosed, SharedFd, pread_exact
from ._probe import Mode
from ._record import QUEUED, read_progress
from ._source import Origin, Version
from ._stats import Stats
from ._waiters import Waiters

__all__ = ("CopySession",)


class CopySession:
    """Everything the readers of one version of one source share in this process."""

    def __init__(
        self,
        *,
        name: str,
        origin: Origin,
        mode: Mode,
        data: SharedFd | None,
        wait_window: int,
        read_limiter: CapacityLimiter,
        stats: Stats,
        on_closed: Callable[[CopySession], None],
    ) -> None:
        self.name = name
        self.origin = origin
        self.mode = mode
        self.data = data
        self.wait_window = wait_window
        # Reads of the local cache file get a few threads of their own: they
        # are quick, and dozens of threads fighting the loop thread for the
        # GIL would delay the loop (a convoy) more than they add throughput.
        # Reads from a slow source run on the slow pool (``slow=True``), never
        # on the threads that file operations need.
        self.read_limiter = read_limiter
        self.stats = stats
        self.refs = 0
        self.error: BaseException | None = None
        self.avail = origin.version.size if mode == "cache" else 0
        self.running = mode == "follow"
        self.done = mode in ("cache", "source")
        self.task: asyncio.Task[None] | None = None
        self.copier: Copier | None = None
        self.lock_fd: int | None = None
        self.cleanup: list[Callable[[], None]] = []
        self._on_closed = on_closed
        self._closed = False
        self._waiters = Waiters()
        self._ping = asyncio.Event()
        # Completed by `abort`: source reads in flight give up on their thread.
        self._aborted: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return (
            f"<CopySession {self.origin.key!r} {self.mode} {self.avail}/{self.size}"
            f" refs={self.refs}>"
        )

    @property
    def size(self) -> int:
        return self.origin.version.size

    @property
    def version(self) -> Version:
        return self.origin.version

    @property
    def shareable(self) -> bool:
        return not self._closed and self.error is None

    # -- progress, on the loop ------------------------------------------------

    def _catch_up(self) -> None:
        """Take in the copy thread's progress; tell it what to wake the loop for.

        Called before every look at ``avail``, whenever a reader starts
        waiting, and when the copy thread posts (through the `Doorbell`,
        possibly after the copy's end was handled: then it changes nothing).
        """
        copier = self.copier
        if copier is None or self.done:
            return
        if copier.started:
            self.running = True
        while True:
            # Interest first, then the look at progress (the thread does the
            # reverse), so no chunk finished in between goes unnoticed.
            copier.wake_at = self._waiters.front
            progress = copier.progress
            if progress <= self.avail:
                return
            self._advance(progress)

    def _advance(self, avail: int) -> None:
        if avail <= self.avail:
            return
        self.avail = avail
        self._waiters.wake_upto(avail)

    def _settle(self, mode: Mode | None = None, error: BaseException | None = None) -> None:
        """No more progress will come: wake every waiter to look again."""
        if mode is not None:
            self.mode = mode
        if error is not None and self.error is None:
            self.error = error
        self.done = True
        self.running = False
        self._waiters.wake_all()

    async def _wait_for(self, end: int) -> None:
        future = self._waiters.add(end)
        self._catch_up()  # the copy thread now wakes us for ``end``, or already passed it
        try:
            await future
        except asyncio.CancelledError:
            self._waiters.abandoned()
            raise

    # -- reading ----------------------------------------------------------------

    async def read(self, offset: int, n: int) -> bytes:
        if offset < 0 or n < 0:
            raise ValueError(f"read(offset={offset}, n={n}): both must be >= 0")
        end = min(offset + n, self.size)
        if offset >= end:
            return b""
        while True:
            if self.error is not None:
                raise self._error_for_reader()
            self._catch_up()
            data = self.data
            if end <= self.avail and data is not None and not data.closed:
                try:
                    got = await run_sync(
                        _read_cached,
                        data,
                        offset,
                        end - offset,
                        self.origin.key,
                        limiter=self.read_limiter,
                    )
                except FdClosed:
                    continue  # the cache failed under us: look again
                return got
            if (
                self.done
                or self.mode == "source"
                or not self.running
                or offset > self.avail + self.wait_window
            ):
                got = await self._read_source(offset, end - offset)
                self.stats.count("source_bytes", len(got))
                return got
            await self._wait_for(end)

    async def _read_source(self, offset: int, n: int) -> bytes:
        """Read from the source on a slow thread, unless the session is aborted first.

        A read only, so it may be abandoned: a source whose ``pread`` hangs
        keeps its thread, not the reader (see `abort`).
        """
        loop = asyncio.get_running_loop()
        if self._aborted is None:
            self._aborted = loop.create_future()
        read = loop.create_task(
            run_sync(self.origin.read_checked, offset, n, abandon_on_cancel=True, slow=True)
        )
        try:
            waits: set[asyncio.Future[Any]] = {read, self._aborted}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not read.done():
                read.cancel()
        if not read.done() or read.cancelled():
            raise self._error_for_reader()
        try:
            return read.result()
        except FdClosed:
            raise ValueError(f"read from {self.origin.key!r} after it was closed") from None

    def abort(self, error: SourceChangedError) -> None:
        """On the loop: fail every reader now, those in a source read included.

        For a copy that did not stop when asked (its source read hangs): its
        thread runs on, but no reader waits for it any more.
        """
        self._settle("source", error)
        if self._aborted is None:
            self._aborted = asyncio.get_running_loop().create_future()
        if not self._aborted.done():
            self._aborted.set_result(None)

    def _error_for_reader(self) -> BaseException:
        assert self.error is not None
        return _fresh_error(self.error, self.origin.key)

    async def wait_settled(self) -> None:
        while not self.done:
            await self._wait_for(self.size + 1)

    # -- copying (this process) --------------------------------------------------

    def start_copy(self, copier: Copier, limiter: CapacityLimiter) -> None:
        self.copier = copier
        # With a free copy slot the thread starts at once: let readers wait for
        # it rather than fetch from the source what the copy brings a moment later.
        # (Followers in other processes read from the source until the thread
        # starts: the probe recorded the copy as QUEUED.)
        self.running = limiter.available_tokens > 0
        self.task = asyncio.get_running_loop().create_task(self._copy(copier, limiter))

    async def _copy(self, copier: Copier, limiter: CapacityLimiter) -> None:
        try:
            # Slow work: the whole copy waits on the source.  Abandoned on
            # cancel (the loop shutting down, or `FileCache.aclose` giving up on
            # a hung source): the copy thread owns its fds and gives them back
            # itself whenever it stops, publishing nothing once cancelled.
            outcome = await run_sync(
                copier.run, self._catch_up, limiter=limiter, slow=True, abandon_on_cancel=True
            )
        except asyncio.CancelledError:
            # If it was still queued for a copy slot, its thread never ran:
            # give back its files.
            copier.cancel.set()
            with contextlib.suppress(BaseException):
                await run_sync(copier.discard_unstarted, slow=True)
            self._settle("source")
            raise
        except BaseException as exc:  # the source changed or failed
            self._settle(error=exc)
            self.stats.count("failed")
        else:
            if outcome == "published":
                self.stats.count("published")
                self._advance(self.size)
                self._settle("cache")
            else:
                self.stats.count("uncached")
                self.data = None  # the copier closed it
                self._settle("source")
        finally:
            self.copier = None
            if self.refs == 0:
                await self._close_now()

    def cancel_copy(self) -> None:
        if self.copier is not None:
            self.copier.cancel.set()

    # -- following a copy made by another process ------------------------------

    def start_follow(self, lock_fd: int, part_fd: int, progress: int, poll: float) -> None:
        self.lock_fd = lock_fd
        self._progressed(progress)
        self.task = asyncio.get_running_loop().create_task(self._follow(lock_fd, part_fd, poll))

    def _progressed(self, progress: int | None) -> None:
        if progress is None:
            return
        # A copier queued in its process has not started: read from the source.
        self.running = progress != QUEUED
        if self.running:
            self._advance(min(progress, self.size))

    def poke(self) -> None:
        """Called when the copier wrote its progress (an inotify event)."""
        self._ping.set()

    async def _follow(self, lock_fd: int, part_fd: int, poll: float) -> None:
        end: asyncio.Future[OSError | None] = asyncio.ensure_future(
            wait_for_lock(part_fd, fcntl.LOCK_SH)
        )
        end.add_done_callback(lambda _: self._ping.set())
        try:
            while True:
                # A 16-byte pread, but of a file of the user's disk (maybe NFS):
                # never on the loop.
                self._progressed(await run_sync(read_progress, lock_fd))
                if self.avail >= self.size:
                    break
                if end.done():
                    self._progressed(await run_sync(read_progress, lock_fd))
                    break
                self._ping.clear()
                with anyio.move_on_after(poll):
                    await self._ping.wait()
            for undo in self.cleanup:
                undo()  # no more progress to watch
            if self.avail >= self.size:
                if not end.done():
                    await end  # the copier downgrades right after its last progress
                self.stats.count("followed")
                self._settle("cache")
            else:
                # The copier failed or died.  What it published was checked;
                # the rest comes from the source.
                self.stats.count("uncached")
                self._settle("source")
        except BaseException:
            end.cancel()
            self._settle("source")
            raise
        finally:
            if self.refs == 0:
                await self._close_now()

    # -- lifetime ---------------------------------------------------------------

    def acquire(self) -> None:
        self.refs += 1

    def release(self, finish_abandoned: bool) -> Callable[[], None] | None:
        """On the loop: one reader less.  Returns what gives the session's fds
        back if that was the last reader, for the caller's worker-thread hop."""
        self.refs -= 1
        if self.refs > 0:
            return None
        if self.task is not None and not self.task.done():
            if self.copier is not None and not finish_abandoned:
                self.copier.cancel.set()
            elif self.copier is None:
                self.task.cancel()  # nobody reads what a follower follows
            return None  # the task closes the session when it ends
        return self.close()

    def close(self) -> Callable[[], None] | None:
        """On the loop: end the session (idempotent).

        Returns the fd calls that give its fds back (None if there are none),
        which the caller runs in a worker thread: closing a file of the
        user's disk may be a round trip to an NFS server.
        """
        if self._closed:
            return None
        self._closed = True
        self._settle()
        for undo in self.cleanup:
            undo()  # inotify watches: calls on our inotify fd, no file of the user's
        self._on_closed(self)
        data, self.data = self.data, None
        lock_fd, self.lock_fd = self.lock_fd, None
        return _give_back(data, lock_fd, self.origin)

    async def _close_now(self) -> None:
        closer = self.close()
        if closer is not None:
            await run_sync(closer, shield=True)


def _read_cached(data: SharedFd, offset: int, n: int, key: str) -> bytes:
    with data.use() as fd:
        got = pread_exact(fd, n, offset)
    if len(got) < n:
        raise SourceChangedError(
            f"the cached copy of {key!r} is shorter than it should be (was it truncated"
            " by hand?); open it again",
            path=key,
        )
    return got


def _fresh_error(error: BaseException, key: str) -> BaseException:
    """The error a reader of a failed session gets: a fresh exception per reader
    (one object raised in many tasks would pile up their tracebacks)."""
    if isinstance(error, SourceChangedError):
        fresh: BaseException = SourceChangedError(str(error), path=error.path)
    else:
        fresh = SourceChangedError(
            f"the copy of {key!r} failed: {error}; open it again",
            path=key,
        )
    fresh.__cause__ = error
    return fresh


def _give_back(
    data: SharedFd | None, lock_fd: int | None, origin: Origin
) -> Callable[[], None] | None:
    """The fd calls that give a closed session's fds back, for a worker thread
    (None if there are none)."""
    if data is None and lock_fd is None and not origin.holds_fd:
        return None

    once = [lock_fd]

    def give_back() -> None:  # idempotent: a cancelled close may be asked again
        try:
            if data is not None:
                data.close()
            origin.close()
        finally:
            fd = once.pop() if once else None
            if fd is not None:
                os.close(fd)

    return give_back
