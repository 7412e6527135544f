"""One file copied from a slow source into the cache while any number of readers read it.

This is the lower half of the copy cache (the upper half, `FileCache`, lives in
``_cache.py``).  A `CopySession` is what every reader of one version of one
source shares inside a process.  It is in one of four modes:

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
import collections
import contextlib
import errno
import fcntl
import hashlib
import heapq
import itertools
import os
import stat
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import anyio
from anyio import CapacityLimiter

from ._durable import fsync_dir, start_writeback
from ._errors import SourceChangedError
from ._flock import wait_for_lock as _wait_for_lock
from ._threads import run_sync

__all__ = ("CLOSE_TIMEOUT", "CopySession", "Doorbell", "Source", "finish")

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
#: How long `FileCache.aclose` waits for a copy to stop before it gives up on
#: it (a source read that hangs): the default of ``FileCache(close_timeout=)``.
CLOSE_TIMEOUT = 5.0


async def finish(func: Callable[[], object], *, slow: bool = False) -> None:
    """Run ``func`` (idempotent: it gives fds back) in a worker thread, to its end.

    Closing changes state, so a cancellation must not keep it from happening:
    a hop dropped before its worker started it is made again, shielded, and
    only then is the cancellation let through.
    """
    try:
        await run_sync(func, slow=slow)
    except asyncio.CancelledError:
        await asyncio.shield(run_sync(func, slow=slow))
        raise


@runtime_checkable
class Source(Protocol):
    """Where the cache copies a file from: a slow mount, an object store, a test double.

    ``key`` is the file's identity in the cache (two sources with the same key
    share one cached copy).  ``size`` and ``mtime`` are read again every time
    the cache checks freshness (before it serves a cached copy and after every
    chunk it copies), so they may be properties that ask the backend.
    ``pread(offset, n)`` returns up to ``n`` bytes at ``offset``; it blocks (the
    cache calls it in worker threads, possibly several at once, so it must be
    thread-safe) and returns fewer bytes only at the end of the file.  A
    ``FileNotFoundError`` from any of them means the file vanished.

    A plain path (`str` or `os.PathLike`) is also accepted wherever a `Source`
    is; its key is its real path.

    Example:
        ```python
        class SlowFile:
            def __init__(self, path: str) -> None:
                self.key = path
                self.path = path

            @property
            def size(self) -> int:
                return os.stat(self.path).st_size

            @property
            def mtime(self) -> float:
                return os.stat(self.path).st_mtime

            def pread(self, offset: int, n: int) -> bytes:
                time.sleep(n / 20e6)  # a 20 MB/s link
                with open(self.path, "rb") as f:
                    return os.pread(f.fileno(), n, offset)

        async with cache.open(SlowFile("/mnt/nfs/video.mp4")) as f:
            first = await f.read(0, 4096)
        ```
    """

    @property
    def key(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def mtime(self) -> float: ...

    def pread(self, offset: int, n: int) -> bytes: ...


@dataclass(frozen=True)
class Version:
    """What makes two states of a source the same file: its size and mtime."""

    size: int
    mtime_ns: int


def entry_name(key: str) -> str:
    """The cached file's name for ``key``: keys may hold any character, names may not."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def mtime_to_ns(mtime: float) -> int:
    # Deterministic for a given float, which is all freshness needs: the cached
    # file gets exactly this many nanoseconds and is compared with it later.
    return round(mtime * 1_000_000_000)


# --------------------------------------------------------------------------
# An fd that several threads use and one of them closes


class FdClosed(Exception):
    """The shared fd was closed (the session switched mode); look again."""


class SharedFd:
    """An fd used by reader threads and closed by whoever retires it.

    ``close`` only marks it; the descriptor is closed when the last read in
    flight gives it back, so a read can never land on a recycled fd number.
    """

    __slots__ = ("_closing", "_fd", "_mutex", "_uses")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._uses = 0
        self._closing = False
        self._mutex = threading.Lock()

    @contextlib.contextmanager
    def use(self) -> Iterator[int]:
        with self._mutex:
            if self._closing:
                raise FdClosed
            self._uses += 1
        try:
            yield self._fd
        finally:
            self._give_back()

    def _give_back(self) -> None:
        with self._mutex:
            self._uses -= 1
            last = self._closing and self._uses == 0
        if last:
            os.close(self._fd)

    def close(self) -> None:
        with self._mutex:
            if self._closing:
                return
            self._closing = True
            idle = self._uses == 0
        if idle:
            os.close(self._fd)

    @property
    def closed(self) -> bool:
        return self._closing


def pread_exact(fd: int, n: int, offset: int) -> bytes:
    """``n`` bytes at ``offset`` (fewer only at end of file); pread may return less."""
    data = os.pread(fd, n, offset)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = os.pread(fd, n - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


# --------------------------------------------------------------------------
# The record in an entry's lock file: what is being copied, and how far
#
# 64 bytes at offset 0.  The progress counter is stored twice (the second
# copy XOR a mask) and the rest carries a CRC: a follower reads it without a
# lock while the copier rewrites it, and must recognize a torn read.

_RECORD = struct.Struct("<QQ8sQqQQI4x")
_PROGRESS = struct.Struct("<QQ")
_MASK = 0x5A5A_5A5A_5A5A_5A5A
_MAGIC = b"ATSCOPY1"
RECORD_SIZE = _RECORD.size
#: The progress of a copy still queued for a copy slot in its process: its
#: followers read from the source meanwhile, as its local readers do.
QUEUED = (1 << 64) - 1


@dataclass(frozen=True)
class Record:
    progress: int
    size: int
    mtime_ns: int
    part_ino: int
    reserved: int


def write_record(fd: int, rec: Record) -> None:
    body = struct.pack("<8sQqQQ", _MAGIC, rec.size, rec.mtime_ns, rec.part_ino, rec.reserved)
    raw = _PROGRESS.pack(rec.progress, rec.progress ^ _MASK) + body
    os.pwrite(fd, raw + struct.pack("<I4x", zlib.crc32(body)), 0)


def clear_record(fd: int) -> None:
    os.pwrite(fd, bytes(RECORD_SIZE), 0)


def write_progress(fd: int, progress: int) -> None:
    os.pwrite(fd, _PROGRESS.pack(progress, progress ^ _MASK), 0)


def read_record(fd: int) -> Record | None:
    """The active record, or None (none, cleared, or unreadable)."""
    for _ in range(8):
        raw = os.pread(fd, RECORD_SIZE, 0)
        if len(raw) < RECORD_SIZE:
            return None
        progress, check, magic, size, mtime_ns, ino, reserved, crc = _RECORD.unpack(raw)
        if magic != _MAGIC:
            return None
        if crc != zlib.crc32(raw[16:56]) or progress ^ _MASK != check:
            continue  # read while being rewritten: read again
        return Record(progress, size, mtime_ns, ino, reserved)
    return None


def read_progress(fd: int) -> int | None:
    for _ in range(8):
        raw = os.pread(fd, _PROGRESS.size, 0)
        if len(raw) < _PROGRESS.size:
            return None
        progress, check = _PROGRESS.unpack(raw)
        if progress ^ _MASK == check:
            return int(progress)
    return None


# --------------------------------------------------------------------------
# Origins: a path or a Source object, seen the same way by the copy


def _changed(what: str, key: str) -> SourceChangedError:
    return SourceChangedError(
        f"the source {key!r} {what} while it was being read; nothing of it was"
        " published to the cache. Open it again to read the current version.",
        path=key,
    )


class CacheFailed(Exception):
    """Writing the cache failed (ENOSPC, EIO...): serve the file uncached."""


class Origin:
    """A source, resolved: its key, its version, and checked reads."""

    key: str
    version: Version
    mtime: float

    def resolve(self) -> None:
        """Find the source and read its key and version (in a worker thread)."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise `SourceChangedError` unless the source still has ``version``."""
        raise NotImplementedError

    def check_final(self) -> None:
        """The check made just before publishing (may look harder)."""
        self.check()

    def pread(self, offset: int, n: int) -> bytes:
        raise NotImplementedError

    def read_checked(self, offset: int, n: int) -> bytes:
        """``n`` bytes at ``offset``, checked to belong to ``version``."""
        data = self.pread(offset, n)
        if len(data) < n:
            self.check()
            raise _changed("got shorter", self.key)
        self.check()
        return data

    def copy_into(self, dst: int, offset: int, n: int) -> int:
        """Copy up to ``n`` bytes at ``offset`` into ``dst`` (same offset).

        Returns the count copied (0: the source ended early).  Raises
        `CacheFailed` when writing ``dst`` failed.
        """
        data = self.pread(offset, n)
        try:
            pwrite_all(dst, data, offset)
        except OSError as exc:
            raise CacheFailed(str(exc)) from exc
        return len(data)

    def close(self) -> None:
        """Release what the origin holds (idempotent, fd calls only: in a worker thread)."""

    @property
    def holds_fd(self) -> bool:
        """Does `close` have an fd to close?  (If not, no thread hop is needed.)"""
        return False


class PathOrigin(Origin):
    """A local file: read through one fd, copied in the kernel."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.fd: SharedFd | None = None
        self._ident = (0, 0)
        self._method = "range" if hasattr(os, "copy_file_range") else "send"

    def resolve(self) -> None:  # in a worker thread
        real = os.path.realpath(self.path)
        # O_NONBLOCK: opening a FIFO must not hang the thread (it is refused
        # below); on a regular file the flag changes nothing.
        fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(
                    errno.EISDIR, "a directory cannot be cached; pass a file", real
                )
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "only regular files can be cached; pass a file", real)
        except BaseException:
            os.close(fd)  # here, in the thread: the caller never sees this fd
            raise
        self.fd = SharedFd(fd)
        self.key = real
        self._ident = (st.st_dev, st.st_ino)
        self.version = Version(st.st_size, st.st_mtime_ns)
        self.mtime = st.st_mtime_ns / 1e9

    def _fstat_matches(self, fd: int) -> bool:
        st = os.fstat(fd)
        return Version(st.st_size, st.st_mtime_ns) == self.version

    def check(self) -> None:
        assert self.fd is not None
        with self.fd.use() as fd:
            if not self._fstat_matches(fd):
                raise _changed("changed", self.key)

    def check_final(self) -> None:
        self.check()
        # Our fd still reads the version we copied even if the path now names
        # another file (deleted, or replaced by rename): publish only if the
        # path still leads to it.
        try:
            st = os.stat(self.key)
        except FileNotFoundError:
            raise _changed("vanished", self.key) from None
        if (st.st_dev, st.st_ino) != self._ident:
            raise _changed("was replaced", self.key)

    def pread(self, offset: int, n: int) -> bytes:
        assert self.fd is not None
        with self.fd.use() as fd:
            return pread_exact(fd, n, offset)

    def copy_into(self, dst: int, offset: int, n: int) -> int:
        assert self.fd is not None
        with self.fd.use() as src:
            try:
                return self._kernel_copy(src, dst, offset, n)
            except OSError as exc:
                # Which side failed?  If the source is intact, it was the cache.
                if not self._fstat_matches(src):
                    raise _changed("changed", self.key) from exc
                raise CacheFailed(str(exc)) from exc

    def _kernel_copy(self, src: int, dst: int, offset: int, n: int) -> int:
        while True:
            if self._method == "range":
                try:
                    return os.copy_file_range(src, dst, n, offset, offset)
                except OSError as exc:
                    # Old kernels, or file systems that refuse it: use sendfile.
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    self._method = "send"
            elif self._method == "send":
                try:
                    os.lseek(dst, offset, os.SEEK_SET)
                    return os.sendfile(dst, src, offset, n)
                except OSError as exc:
                    if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    self._method = "copy"
            else:
                data = pread_exact(src, n, offset)
                pwrite_all(dst, data, offset)
                return len(data)

    def close(self) -> None:
        if self.fd is not None:
            self.fd.close()

    @property
    def holds_fd(self) -> bool:
        return self.fd is not None and not self.fd.closed


class ObjectOrigin(Origin):
    """A `Source` object; ``FileNotFoundError`` from it means it vanished."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def resolve(self) -> None:  # in a worker thread
        self.key = str(self.source.key)
        size, mtime = self._attributes()
        self.mtime = mtime
        self.version = Version(size, mtime_to_ns(mtime))

    def _attributes(self) -> tuple[int, float]:
        try:
            return int(self.source.size), float(self.source.mtime)
        except FileNotFoundError:
            raise _changed("vanished", self.key) from None

    def check(self) -> None:
        size, mtime = self._attributes()
        if Version(size, mtime_to_ns(mtime)) != self.version:
            raise _changed("changed", self.key)

    def pread(self, offset: int, n: int) -> bytes:
        try:
            return bytes(self.source.pread(offset, n))
        except FileNotFoundError:
            raise _changed("vanished", self.key) from None


# --------------------------------------------------------------------------
# How a copy thread wakes the event loop


def open_doorbell_fd() -> int:
    """An eventfd for a `Doorbell`, or -1 where there is none (not Linux).
    Names no path; called in the worker thread that prepares the cache."""
    if not hasattr(os, "eventfd"):
        return -1
    try:
        return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    except OSError:
        return -1


class Doorbell:
    """Hands calls from copy threads to the event loop, waking it through an eventfd.

    Why not ``loop.call_soon_threadsafe``: it wakes the loop by writing to a
    socket, and Linux wakes a socket's reader with the *sync* hint ("the writer
    is about to sleep"), so the scheduler puts the loop thread on the copy
    thread's CPU, even when another CPU is idle.  The copy thread does not
    sleep: it goes straight back into a ``copy_file_range`` or ``fsync`` that
    runs for milliseconds in the kernel, where a non-preemptible kernel lets it
    run until the next tick, and the loop thread waits behind it.  On a 2-CPU
    VM, posting each chunk's progress that way took the loop's p99 lag from
    0.1-0.2 ms (no posts) to 0.9-1.5 ms with 4 ms stalls; through an eventfd
    (woken without the hint, so the loop thread stays on an idle CPU) it stays
    at 0.1-0.2 ms.  Calls are queued and the eventfd is written only when the
    queue was empty, so a busy loop gets one wake-up for many posts.

    Calls arrive in order among themselves, but not in order with work that
    completes through ``call_soon_threadsafe`` (a ``run_sync`` returning):
    their targets must tolerate arriving late.  Where there is no eventfd, and
    after `close`, calls go through ``call_soon_threadsafe``.
    """

    __slots__ = ("_armed", "_calls", "_fd", "_loop", "_mutex")

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self._loop = loop
        self._calls: collections.deque[tuple[Callable[..., None], tuple[Any, ...]]] = (
            collections.deque()
        )
        self._mutex = threading.Lock()
        self._armed = False  # the eventfd was written and not yet read
        self._fd = -1
        if fd >= 0:
            try:
                loop.add_reader(fd, self._ring)
            except (NotImplementedError, OSError, ValueError):
                os.close(fd)  # a loop without add_reader: call_soon_threadsafe
            else:
                self._fd = fd

    def post(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop soon; from any thread."""
        with self._mutex:
            if self._fd >= 0:
                self._calls.append((fn, args))
                if not self._armed:
                    self._armed = True
                    # Under the mutex: close() cannot free the fd number meanwhile.
                    os.eventfd_write(self._fd, 1)
                return
        # A closed loop raises RuntimeError: nobody is reading any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, *args)

    def _ring(self) -> None:  # on the loop
        with self._mutex:
            if self._fd < 0:
                return
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._fd)
            self._armed = False
            calls, self._calls = self._calls, collections.deque()
        for fn, args in calls:
            fn(*args)

    def detach(self) -> int:
        """On the loop: stop listening; calls posted later use ``call_soon_threadsafe``.

        Returns the eventfd (-1 if none) for the caller to close, in the worker
        thread that closes the cache's other fds.
        """
        with self._mutex:
            fd, self._fd = self._fd, -1
            calls, self._calls = self._calls, collections.deque()
        if fd >= 0:
            self._loop.remove_reader(fd)
        for fn, args in calls:
            self._loop.call_soon(fn, *args)
        return fd

    def close(self) -> None:
        """`detach`, then close the eventfd here (an fd of ours, not the user's)."""
        fd = self.detach()
        if fd >= 0:
            os.close(fd)


# --------------------------------------------------------------------------
# The copy, in one worker thread


class Ledger(Protocol):
    """What the copy needs from the cache directory's space ledger (``_cache``)."""

    def publish(self, name: str, lock_fd: int) -> None: ...

    def cancel(self, name: str, lock_fd: int, reserved: int) -> None: ...


class Stats(Protocol):
    """Counters the cache keeps (thread-safe)."""

    def count(self, what: str, n: int = 1) -> None: ...


class _Cancelled(Exception):
    pass


class Copier:
    """Copies one source into its part file; everything here runs in one thread.

    Owns the part file's fd (``LOCK_EX`` held) and the entry lock's fd (held)
    from the moment the probe hands them over; `run` gives both back whatever
    happens.  The loop learns about progress through ``post``.
    """

    def __init__(
        self,
        *,
        origin: Origin,
        name: str,
        root: str,
        part: SharedFd,
        part_fd: int,
        lock_fd: int,
        reserved: int,
        ledger: Ledger,
        stats: Stats,
        chunk_size: int,
        clock_ns: Callable[[], int],
        post: Callable[..., None],
    ) -> None:
        self.origin = origin
        self.name = name
        self.root = root
        self.part = part
        self.part_fd = part_fd
        self.lock_fd = lock_fd
        self.reserved = reserved
        self.ledger = ledger
        self.stats = stats
        self.chunk_size = chunk_size
        self.clock_ns = clock_ns
        self.post = post
        self.cancel = threading.Event()
        self.started = False
        #: Checked bytes copied so far: written by the copy thread only.
        self.progress = 0
        #: Post ``on_progress`` once ``progress`` reaches this (a reader waits for
        #: it): written by the loop only (`CopySession._catch_up`).
        self.wake_at = NOBODY
        self._done = False
        self._mutex = threading.Lock()

    def run(self, on_progress: Callable[[], None]) -> str:
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

    def _run(self, on_progress: Callable[[], None]) -> str:
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
                raise _changed("got shorter", self.origin.key)
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


# --------------------------------------------------------------------------
# The session the readers of one process share


class CopySession:
    """Everything the readers of one version of one source share in this process."""

    def __init__(
        self,
        *,
        name: str,
        origin: Origin,
        mode: str,
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
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._abandoned_waits = 0
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
            copier.wake_at = self._waiters[0][0] if self._waiters else NOBODY
            progress = copier.progress
            if progress <= self.avail:
                return
            self._advance(progress)

    def _advance(self, avail: int) -> None:
        if avail <= self.avail:
            return
        self.avail = avail
        waiters = self._waiters
        while waiters and waiters[0][0] <= avail:
            future = heapq.heappop(waiters)[2]
            if not future.done():
                future.set_result(None)

    def _settle(self, mode: str | None = None, error: BaseException | None = None) -> None:
        """No more progress will come: wake every waiter to look again."""
        if mode is not None:
            self.mode = mode
        if error is not None and self.error is None:
            self.error = error
        self.done = True
        self.running = False
        waiters, self._waiters = self._waiters, []
        for _, _, future in waiters:
            if not future.done():
                future.set_result(None)

    async def _wait_for(self, end: int) -> None:
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (end, next(self._seq), future))
        self._catch_up()  # the copy thread now wakes us for ``end``, or already passed it
        try:
            await future
        except asyncio.CancelledError:
            # A cancelled wait stays in the heap until progress passes it;
            # many of them (a client that keeps hanging up) are swept out.
            self._abandoned_waits += 1
            if self._abandoned_waits > 256 and self._abandoned_waits * 2 > len(self._waiters):
                self._waiters = [w for w in self._waiters if not w[2].done()]
                heapq.heapify(self._waiters)
                self._abandoned_waits = 0
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
        error = self.error
        assert error is not None
        # A fresh exception per reader: one object raised in many tasks would
        # pile up their tracebacks.
        if isinstance(error, SourceChangedError):
            fresh: BaseException = SourceChangedError(str(error), path=error.path)
        else:
            fresh = SourceChangedError(
                f"the copy of {self.origin.key!r} failed: {error}; open it again",
                path=self.origin.key,
            )
        fresh.__cause__ = error
        return fresh

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
            _wait_for_lock(part_fd, fcntl.LOCK_SH)
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
        origin = self.origin
        if data is None and lock_fd is None and not origin.holds_fd:
            return None

        once = [lock_fd]

        def give_back() -> None:  # idempotent: `finish` may call it twice
            try:
                if data is not None:
                    data.close()
                origin.close()
            finally:
                fd = once.pop() if once else None
                if fd is not None:
                    os.close(fd)

        return give_back

    async def _close_now(self) -> None:
        closer = self.close()
        if closer is not None:
            await finish(closer)


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
