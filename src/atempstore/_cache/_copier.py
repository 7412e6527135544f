"""The copier: one source copied into its part file, checked, then published.

Everything a `Copier` does runs in one worker thread (a slow one: it waits on
the source), so it is a plain blocking class: it copies in chunks that start
small (the first reader's first bytes come quickly) and double, checks the
source's version after every chunk and only then publishes the progress (in
the entry's record for other processes, in ``progress`` for this one), starts
the disk's writeback behind it, and at the end gives the part the source's
mtime, fsyncs it and renames it into place through the directory's ledger.
The loop learns about progress only when a reader waits for it, through the
``post`` it is given (a `Doorbell`'s).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from .._durable import fsync_dir, start_writeback
from ._fd import FdClosed, SharedFd
from ._record import write_progress
from ._source import CacheFailed, Origin, PathOrigin, changed
from ._stats import Stats

__all__ = ("FIRST_CHUNK", "KERNEL_CHUNK", "NOBODY", "Copier", "Outcome", "Publisher")

KiB = 1 << 10
MiB = 1 << 20

#: The first chunk a copy takes: small, so the first reader's first bytes come quickly;
#: later chunks double up to the configured size, so a long copy runs in large chunks.
FIRST_CHUNK = 64 * KiB
#: Chunks of an in-kernel copy.  No memory of ours is involved, but a kernel
#: without preemption runs one copy_file_range call to its end while other
#: threads (the event loop's among them) wait for that CPU: against 8 MiB,
#: 1 MiB chunks kept the loop's p99 lag during copies at 0.20-0.23 ms instead
#: of 0.34-0.36 ms, at the same copy speed (``benchmarks/bench_copysession.py``).
KERNEL_CHUNK = 1 * MiB
#: `Copier.wake_at` when no reader of this process waits for the copy.
NOBODY = 1 << 64

#: How a copy ended when it did not raise: published under the final name,
#: given up because the cache's disk failed (readers go to the source), or
#: cancelled (nothing published).
Outcome = Literal["published", "uncached", "cancelled"]


class Publisher(Protocol):
    """What the copy needs from the cache directory (`_directory.Directory`)."""

    def publish(self, name: str, lock_fd: int) -> None: ...

    def cancel(self, name: str, lock_fd: int, reserved: int) -> None: ...


class _Cancelled(Exception):
    pass


@dataclass(eq=False, repr=False, kw_only=True)
class Copier:
    """Copies one source into its part file; everything here runs in one thread.

    Owns the part file's fd (``LOCK_EX`` held) and the entry lock's fd (held)
    from the moment the probe hands them over; `run` gives both back whatever
    happens.  The loop learns about progress through ``post``.
    """

    origin: Origin
    name: str
    root: str
    part: SharedFd
    part_fd: int
    lock_fd: int
    reserved: int
    ledger: Publisher
    stats: Stats
    chunk_size: int
    clock_ns: Callable[[], int]
    post: Callable[..., None]
    cancel: threading.Event = field(default_factory=threading.Event, init=False)
    started: bool = field(default=False, init=False)
    #: Checked bytes copied so far: written by the copy thread only.
    progress: int = field(default=0, init=False)
    #: Post ``on_progress`` once ``progress`` reaches this (a reader waits for
    #: it): written by the loop only (`CopySession._catch_up`).
    wake_at: int = field(default=NOBODY, init=False)
    _done: bool = field(default=False, init=False)
    _mutex: threading.Lock = field(default_factory=threading.Lock, init=False)

    def run(self, on_progress: Callable[[], None]) -> Outcome:
        """Copy, then publish.  Returns "published", "uncached" or "cancelled";
        raises `SourceChangedError` (or the source's own error)."""
        with self._mutex:
            if self._done:
                return "cancelled"
            self.started = True
        try:
            # Held for the whole run, so the part's fd number stays ours even
            # if the session lets go of it first (a copy abandoned because its
            # source hangs, see `FileCache.aclose`).
            use = self.part.use()
            use.__enter__()
        except FdClosed:
            self._abandon()
            return "cancelled"
        try:
            return self._run(on_progress)
        finally:
            use.__exit__(None, None, None)

    def _run(self, on_progress: Callable[[], None]) -> Outcome:
        try:
            if self.cancel.is_set():
                raise _Cancelled
            try:
                write_progress(self.lock_fd, 0)  # no longer QUEUED: followers wait for us
            except OSError as exc:
                raise CacheFailed(str(exc)) from exc
            self._copy_all(on_progress)
            if self.cancel.is_set():
                raise _Cancelled  # the cache closed during the last chunk: publish nothing
            self._publish()
        except _Cancelled:
            self._abandon()
            return "cancelled"
        except CacheFailed:
            self._abandon()
            return "uncached"
        except BaseException:
            self._abandon()
            raise
        return "published"

    def discard_unstarted(self) -> bool:
        """Give everything back if `run` never started (its task went away first)."""
        with self._mutex:
            if self.started or self._done:
                return False
            self._done = True
        self._abandon()
        return True

    def _copy_all(self, on_progress: Callable[[], None]) -> None:
        size = self.origin.version.size
        kernel = isinstance(self.origin, PathOrigin)
        largest = max(self.chunk_size, KERNEL_CHUNK) if kernel else self.chunk_size
        chunk = min(FIRST_CHUNK, largest)
        offset = 0
        while offset < size:
            if self.cancel.is_set():
                raise _Cancelled
            copied = self.origin.copy_into(self.part_fd, offset, min(chunk, size - offset))
            if copied <= 0:
                self.origin.check()
                raise changed("got shorter", self.origin.key)
            # Checked *after* the bytes were copied and *before* anyone may
            # read them: a change during the copy can never leak mixed data.
            self.origin.check()
            # The disk writes the chunk while the next one is copied: the
            # final fsync, otherwise a long stall with the whole file dirty,
            # finds little left to write.
            start_writeback(self.part_fd, offset, copied)
            offset += copied
            try:
                write_progress(self.lock_fd, offset)
            except OSError as exc:
                raise CacheFailed(str(exc)) from exc
            self.stats.count("copied_bytes", copied)
            # Progress first, then the look at wake_at (the loop does the
            # reverse): a reader that starts waiting meanwhile is either woken
            # here or sees the progress itself.  Nobody waiting, no wake-up.
            self.progress = offset
            if offset >= self.wake_at:
                self.post(on_progress)
            chunk = min(chunk * 2, largest)

    def _publish(self) -> None:
        version = self.origin.version
        try:
            # The mtime first, then fsync: the rename below must never expose
            # a file whose data or mtime a crash could still lose.
            os.utime(self.part_fd, ns=(self.clock_ns(), version.mtime_ns))
            os.fsync(self.part_fd)
        except OSError as exc:
            raise CacheFailed(str(exc)) from exc
        self.origin.check_final()
        try:
            write_progress(self.lock_fd, version.size)
            # Followers wake on this: the data is complete and durable.
            fcntl.flock(self.part_fd, fcntl.LOCK_SH)
            self.ledger.publish(self.name, self.lock_fd)
        except OSError as exc:
            raise CacheFailed(str(exc)) from exc
        with self._mutex:
            self._done = True
        with contextlib.suppress(OSError):
            # The file is whole under its name already; a failed directory
            # fsync only means the name might not survive a power cut.
            fsync_dir(self.root)
        self._release_entry_lock()

    def _abandon(self) -> None:
        with self._mutex:
            self._done = True
        try:
            self.ledger.cancel(self.name, self.lock_fd, self.reserved)
        except OSError:
            pass  # the ledger heals at its next recount; the entry lock still goes
        finally:
            self.part.close()
            self._release_entry_lock()

    def _release_entry_lock(self) -> None:
        fd, self.lock_fd = self.lock_fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
