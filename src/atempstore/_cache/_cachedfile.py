"""A reader of the cache: `CachedFile`, and the `_Opening` that `FileCache.open` returns.

A `CachedFile` is one reader's handle on a shared `CopySession`: cheap, one
per open, each coroutine a thin facade over the session (one hop, or a wait
for the copy).  Closing the last reader of a session gives the session's fds
back in that reader's own hop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Generator
from types import TracebackType
from typing import Any, Protocol

from anyio.abc import AsyncResource

from .._threads import run_sync
from ._session import CopySession
from ._source import FileInfo, Origin

__all__ = ("CachedFile", "Owner")


class Owner(Protocol):
    """What a reader reads from its `FileCache` (when it needs it: they may change)."""

    read_size: int
    finish_abandoned: bool


class _Opening:
    """What `FileCache.open` returns: await it, or use it with ``async with``."""

    __slots__ = ("_file", "_open")

    def __init__(self, open_: Callable[[], Coroutine[Any, Any, CachedFile]]) -> None:
        self._open = open_
        self._file: CachedFile | None = None

    def __await__(self) -> Generator[Any, None, CachedFile]:
        return self._open().__await__()

    async def __aenter__(self) -> CachedFile:
        self._file = await self._open()
        return self._file

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._file is not None:
            await self._file.aclose()


class CachedFile(AsyncResource):
    """A reader of one version of one source, returned by `FileCache.open`.

    ``size`` and ``mtime`` are the source's at open time; every byte a reader
    gets belongs to that version (a source that changes under a copy raises
    `SourceChangedError`, never mixed data).  Readers of one source share one
    copy; each reader is cheap.

    Example:
        ```python
        async with cache.open(path) as f:
            print(f.size, f.mtime, f.etag, f.mode)
            async for chunk in f.iter_bytes(1000, 2000):  # bytes 1000..1999
                ...
        ```
    """

    def __init__(self, cache: Owner, session: CopySession, spare: Origin | None = None) -> None:
        self._cache = cache
        self._session = session
        # This reader's own view of the source when it shares a session that
        # has one: its fd is closed in `aclose`'s hop, never on the loop.
        self._spare = spare
        self._closed = False

    def __repr__(self) -> str:
        return f"<CachedFile {self.key!r} size={self.size} mode={self.mode}>"

    @property
    def key(self) -> str:
        """The source's key (a path's real path)."""
        return self._session.origin.key

    @property
    def size(self) -> int:
        """The size in bytes."""
        return self._session.size

    @property
    def mtime(self) -> float:
        """The source's modification time (seconds since the epoch)."""
        return self._session.origin.mtime

    @property
    def etag(self) -> str:
        """A strong validator for HTTP: changes whenever the version does (size,
        mtime and, for a local file, its identity: inode and ctime); the same as
        `info`'s and `FileCache.stat`'s."""
        return self.info.etag

    @property
    def info(self) -> FileInfo:
        """The version read: key, size, mtime and an ETag that also changes with
        a local file's identity (inode, ctime), as `FileCache.stat` gives it.

        Example:
            ```python
            async with cache.open(path) as f:
                assert f.info.etag == (await cache.stat(path)).etag  # unless it changed
            ```
        """
        origin = self._session.origin
        return FileInfo.of(origin.key, origin.version, origin.mtime)

    @property
    def mode(self) -> str:
        """Where bytes come from now.

        ``"cache"`` (a complete cached copy), ``"copy"`` (this process copies),
        ``"follow"`` (another process copies), or ``"source"`` (uncached).
        """
        return self._session.mode

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"read from a closed {self!r}")

    async def read(self, offset: int, n: int) -> bytes:
        """Read ``n`` bytes at ``offset``; fewer only at the end of the file.

        Copied bytes come from the cache; bytes just ahead of the copy (within
        ``wait_window``) are waited for; bytes further ahead come straight from
        the source.

        Example:
            ```python
            async with cache.open(path) as f:
                block = await f.read(4096, 65536)
            ```
        """
        self._check_open()
        return await self._session.read(offset, n)

    async def iter_bytes(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Yield the bytes of ``[start, end)`` in chunks of up to ``read_size`` (bounded memory).

        ``end`` is exclusive and defaults to the end of the file; both are
        clipped to the file.

        Example:
            ```python
            async with cache.open(path) as f:
                async for chunk in f.iter_bytes(0, f.size):
                    await response.send(chunk)
            ```
        """
        if start < 0 or (end is not None and end < start):
            raise ValueError(f"iter_bytes(start={start}, end={end}): need 0 <= start <= end")
        stop = self.size if end is None else min(end, self.size)
        largest = self._cache.read_size
        # Small first, so the first bytes come quickly (from a slow source
        # too), then doubling: a long stream costs few thread hops.
        step = min(64 * 1024, largest)
        position = start
        while position < stop:
            chunk = await self.read(position, min(step, stop - position))
            if not chunk:
                return
            position += len(chunk)
            step = min(step * 2, largest)
            yield chunk

    async def wait_cached(self) -> bool:
        """Wait until the copy is over; True if the whole file is now in the cache.

        Example:
            ```python
            f = await cache.open(path)
            try:
                cached = await f.wait_cached()  # warm the cache
            finally:
                await f.aclose()
            ```
        """
        self._check_open()
        await self._session.wait_settled()
        return self._session.mode == "cache"

    async def aclose(self) -> None:
        """Stop reading; a second call does nothing.

        When the last reader of a source leaves, the copy still runs to the
        end (unless the cache was made with ``finish_abandoned=False``).

        Example:
            ```python
            f = await cache.open(path)
            try:
                data = await f.read(0, 100)
            finally:
                await f.aclose()
            ```
        """
        if self._closed:
            return
        self._closed = True
        session = self._session
        closer = session.release(self._cache.finish_abandoned)
        spare, self._spare = self._spare, None
        if spare is not None and spare.holds_fd:
            closer = _both(spare.close, closer)
        if closer is not None:
            # The last reader of a session gives its fds back in this one hop.
            await run_sync(closer, shield=True)
        task = session.task
        if session.refs == 0 and task is not None and session.copier is None and not task.done():
            await asyncio.wait({task})  # a follower stopping: let it give back its fds

    async def __aenter__(self) -> CachedFile:
        return self


def _both(first: Callable[[], None], then: Callable[[], None] | None) -> Callable[[], None]:
    def both() -> None:
        try:
            first()
        finally:
            if then is not None:
                then()

    return both
