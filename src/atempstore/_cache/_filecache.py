"""The public `FileCache`: a thin facade of one-hop coroutines over the cache's cores.

A `FileCache` owns one directory, which any number of processes may share
(its layout: `_record`).  _Opening a source resolves it (one hop), then asks
the `SessionTable` for a session: is a fresh copy there (size and mtime
match)?  Else, can this process take the entry lock?  Then it copies (a
`Copier` in a slow thread, space reserved in the `Directory`'s ledger,
least-recently-opened copies nobody holds evicted if needed).  If another
process holds the entry lock, this one *follows* its part file instead of
copying again.  If no space can be made, the file is served uncached, from
the source.  The readers are `CachedFile` objects (`_cachedfile`).

Where to read next: `_session` (what readers share), `_copier` (the copy),
`_directory` and `_probe` (the directory, blocking), `_record` (the bytes on
disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from anyio import CapacityLimiter
from anyio.abc import AsyncResource

from .._threads import run_sync
from ._cachedfile import CachedFile, _Opening
from ._copier import MiB
from ._directory import Directory
from ._doorbell import Doorbell, open_doorbell_fd
from ._notifier import Notifier, load_asyncinotify
from ._record import LedgerBusy
from ._session import CopySession
from ._source import FileInfo, Source, origin_for, stat_source
from ._stats import Stats
from ._table import SessionTable

__all__ = ("CLOSE_TIMEOUT", "FileCache")

T = TypeVar("T")

#: How long `FileCache.aclose` waits for a copy to stop before it gives up on
#: it (a source read that hangs): the default of ``FileCache(close_timeout=)``.
CLOSE_TIMEOUT = 5.0


class FileCache(AsyncResource):
    """A local cache that serves files to many async readers *while* it copies them.

    ``directory`` holds the cached copies; it is created (mode 0700) on first
    use and may be shared by several processes.  ``max_size`` bounds the bytes
    of cached copies (and copies in progress) in it; least-recently-opened
    copies that no reader holds, in any process, are evicted to make room.
    When no room can be made, or the cache's disk fails (ENOSPC, EIO), files
    are served uncached, straight from the source, with exact bytes.

    A read more than ``wait_window`` bytes ahead of a copy in progress is
    served from the source at once instead of waiting.  ``chunk_size`` is the
    largest chunk a `Source` object is copied in (local paths are copied in the
    kernel, in larger chunks); ``read_size`` is the largest chunk
    `CachedFile.iter_bytes` yields (it starts at 64 KiB and doubles), so a
    reader holds at most that much memory.  With ``finish_abandoned`` (the
    default) a copy runs to the end even when every reader has left; without
    it, it is cancelled.  At most ``max_copies`` copies run at once; the
    readers of a queued copy read from the source meanwhile.  Reads of the
    local cache file use at most ``read_threads`` worker threads (default: one
    less than the CPUs, 1 to 4; more would take the event loop's CPU without
    adding throughput).  ``lock_timeout`` bounds how long an open waits for
    another process that holds an entry without copying it (it then serves
    the file uncached).  ``poll_interval`` is the followers' safety poll.
    ``clock`` is injectable (it stamps the last open of a copy) so eviction
    order can be made deterministic in tests.  ``close_timeout`` bounds how
    long `aclose` waits for a copy to stop (a source read that hangs); the
    readers of a copy it gives up on get `SourceChangedError`.

    The constructor does no I/O.  Use it as an async context manager; leaving
    it cancels the copies still running, removes their temporary files and
    waits for them to stop.

    Example:
        ```python
        async with FileCache("/var/cache/media", max_size=20 * 2**30) as cache:
            async with cache.open("/mnt/nfs/video.mp4") as f:
                async for chunk in f.iter_bytes(0, f.size):
                    await send(chunk)
        ```
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_size: int = 1 << 30,
        wait_window: int = 1 * MiB,
        chunk_size: int = 1 * MiB,
        read_size: int = 512 * 1024,
        finish_abandoned: bool = True,
        max_copies: int = 8,
        read_threads: int | None = None,
        lock_timeout: float = 10.0,
        poll_interval: float = 0.25,
        clock: Callable[[], float] = time.time,
        close_timeout: float = CLOSE_TIMEOUT,
    ) -> None:
        for label, value in (
            ("max_size", max_size),
            ("chunk_size", chunk_size),
            ("read_size", read_size),
            ("max_copies", max_copies),
            ("read_threads", 1 if read_threads is None else read_threads),
        ):
            if value <= 0:
                raise ValueError(f"{label} must be > 0, got {value!r}")
        if wait_window < 0:
            raise ValueError(f"wait_window must be >= 0, got {wait_window!r}")
        if close_timeout < 0:
            raise ValueError(f"close_timeout must be >= 0, got {close_timeout!r}")
        self._directory = Path(directory)
        self.max_size = max_size
        self.wait_window = wait_window
        self.chunk_size = chunk_size
        self.read_size = read_size
        self.finish_abandoned = finish_abandoned
        self.max_copies = max_copies
        self.read_threads = read_threads
        self.lock_timeout = lock_timeout
        self.poll_interval = poll_interval
        self.close_timeout = close_timeout
        self._stats = Stats()
        self._dir = Directory(os.fspath(directory), max_size, clock, self._stats)
        self._notifier = Notifier()
        self._dir.add_watch = self._notifier.add_watch
        self._table = SessionTable(self, self._dir, self._notifier, self._stats)
        #: The sessions not yet closed (the table's own set).
        self._live: set[CopySession] = self._table.live
        self._ready_lock: asyncio.Lock | None = None
        self._ready = False
        self._closed = False
        self._shut = False  # aclose() finished (a cancelled one may be resumed)
        self._doorbell: Doorbell | None = None

    def __repr__(self) -> str:
        return f"<FileCache {os.fspath(self._directory)!r} max_size={self.max_size}>"

    @property
    def directory(self) -> Path:
        """The cache directory, as given."""
        return self._directory

    async def __aenter__(self) -> FileCache:
        await self._ensure_ready()
        return self

    async def _ensure_ready(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed; create a new FileCache")
        if self._ready:
            return
        if self._ready_lock is None:
            self._ready_lock = asyncio.Lock()
        async with self._ready_lock:
            if not self._ready:
                cpus, asyncinotify, bell_fd = await ledger_hop(
                    _prepare, self._dir, undo=_unprepare(self._dir)
                )
                self._doorbell = Doorbell(asyncio.get_running_loop(), bell_fd)
                # One core stays free for the event loop (and the copy thread):
                # on 2 cores, 4 busy readers made the loop wait several ms.
                threads = self.read_threads or max(1, min(4, cpus - 1))
                self._table.start(
                    self._doorbell, CapacityLimiter(self.max_copies), CapacityLimiter(threads)
                )
                self._notifier.start(asyncinotify)
                self._ready = True

    def open(self, source: Source | str | os.PathLike[str]) -> _Opening:
        """Open ``source`` (a path or a `Source`) for reading through the cache.

        Use as ``async with cache.open(source) as f`` or ``f = await
        cache.open(source)`` (then call ``await f.aclose()``).  _Opening checks
        the cached copy's freshness (size and mtime against the source's);
        a missing or outdated copy starts a copy, shared with every other
        reader of the same source, in this process or another one.  Raises
        what the source raises (``FileNotFoundError`` for a missing path).

        Example:
            ```python
            async with cache.open("/mnt/nfs/big.iso") as f:
                header = await f.read(0, 512)
                tail = await f.read(f.size - 4096, 4096)  # served at once
            ```
        """
        return _Opening(partial(self._open, source))

    async def stat(self, source: Source | str | os.PathLike[str]) -> FileInfo:
        """What ``source`` is now (size, mtime, ETag), without a copy or a read.

        One hop: the source is resolved (a path opened and fstat'ed, a
        `Source` object's ``size`` and ``mtime`` asked) and let go.  Nothing
        in the cache directory is touched, so answering a ``HEAD`` or a
        conditional request from it starts no copy.  Raises what `open`
        raises for a missing source (``FileNotFoundError``) or a directory
        (``IsADirectoryError``).

        Example:
            ```python
            info = await cache.stat("/mnt/nfs/video.mp4")
            print(info.size, info.etag)
            ```
        """
        return await run_sync(stat_source, source, slow=not _is_path(source))

    async def _open(self, source: Source | str | os.PathLike[str]) -> CachedFile:
        origin = origin_for(source)
        await self._ensure_ready()
        self._stats.count("opens")
        # A Source object's size and mtime may ask a slow backend: slow work.
        await run_sync(origin.resolve, slow=origin.slow_resolve, undo=lambda _: origin.close())
        try:
            session, spare = await self._table.share(origin)
        except BaseException:
            if origin.holds_fd:
                await run_sync(origin.close, shield=True)
            raise
        return CachedFile(self, session, spare)

    async def usage(self) -> int:
        """Bytes the cache accounts for: cached copies plus copies in progress.

        Never more than ``max_size``.

        Example:
            ```python
            used = await cache.usage()
            print(f"{used / cache.max_size:.0%} full")
            ```
        """
        await self._ensure_ready()
        return await ledger_hop(self._dir.usage)

    def stats(self) -> dict[str, int]:
        """Counters since this cache was created (no I/O).

        ``opens``, ``hits`` (served from a cached copy), ``copies`` (started
        here), ``published``, ``follows`` (copies of another process followed),
        ``followed`` (of those, completed), ``uncached`` (served from the
        source), ``failed`` (source changed or failed), ``evicted``,
        ``outdated``, ``copied_bytes`` and ``source_bytes`` (read from sources
        directly by readers).

        Example:
            ```python
            s = cache.stats()
            print(f"hit ratio {s['hits'] / max(s['opens'], 1):.0%}")
            ```
        """
        return self._stats.snapshot()

    async def aclose(self) -> None:
        """Cancel the copies still running, remove their temporary files, wait for them.

        Readers still open keep working: what was not copied is read from the
        source.  A second call does nothing.

        Example:
            ```python
            cache = FileCache("cache", max_size=2**30)
            try:
                ...
            finally:
                await cache.aclose()
            ```
        """
        if self._shut:
            return
        # A cancelled aclose() may be resumed: every step below is idempotent.
        self._closed = True
        await self._table.stop(self.close_timeout)
        close_inotify = await self._notifier.stop()
        bell_fd = self._doorbell.detach() if self._doorbell is not None else -1
        directory = self._dir if self._ready else None

        def shut() -> None:  # idempotent: a cancelled close may be asked again
            try:
                if close_inotify is not None:
                    close_inotify()
            finally:
                try:
                    if bell_fd >= 0:
                        with contextlib.suppress(OSError):
                            os.close(bell_fd)
                finally:
                    if directory is not None:
                        directory.close()

        # One hop for every fd the cache itself holds (inotify, the copy
        # threads' eventfd, the ledger): never closed on the loop.
        once = [shut]
        await run_sync(lambda: once.pop()() if once else None, shield=True)
        self._shut = True


async def ledger_hop(func: Callable[..., T], *args: Any, undo: Any = None) -> T:
    """Run ``func(*args, wait)`` in one hop: ``wait=False`` on a file thread,
    and only if the ledger was held (`LedgerBusy`), ``wait=True`` on a slow one."""
    try:
        return await run_sync(partial(func, *args), False, undo=undo)
    except LedgerBusy:
        return await run_sync(partial(func, *args), True, slow=True, undo=undo)


def _is_path(source: object) -> bool:
    # A Source object's size and mtime may ask a slow backend: slow work.
    return isinstance(source, (str, bytes, os.PathLike))


def _prepare(directory: Directory, wait: bool) -> tuple[int, Any, int]:
    """Open the cache directory; count CPUs (may read /sys); import asyncinotify;
    open the copy threads' doorbell (see `Doorbell`)."""
    directory.open(wait)
    cpus = os.cpu_count() or 2
    asyncinotify = load_asyncinotify()
    return cpus, asyncinotify, open_doorbell_fd()


def _unprepare(directory: Directory) -> Callable[[tuple[int, Any, int]], None]:
    """Undo `_prepare` for a caller cancelled while it ran (in a worker thread)."""

    def undo(prepared: tuple[int, Any, int]) -> None:
        directory.close()
        if prepared[2] >= 0:
            os.close(prepared[2])

    return undo
