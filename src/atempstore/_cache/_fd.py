"""Fds that several threads share.

A session's cache file and a path origin's source fd are read by several
worker threads at once and retired by whichever side stops using them first;
`SharedFd` makes that safe (a read never lands on a recycled fd number).
The loop side gives fds back with ``run_sync(..., shield=True)``: in a worker
thread, to the end, even when the caller is cancelled.  Nothing here knows
about the cache.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

__all__ = ("FdClosed", "SharedFd", "pread_exact", "pwrite_all")


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
