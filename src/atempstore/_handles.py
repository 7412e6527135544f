"""Turning an already-open Python file object into an aiofiles handle.

Opening happens in a worker thread (it names a file); wrapping is pure Python
and happens on the loop.  Keeping it here means every component hands out the
same kinds of handle.
"""

from __future__ import annotations

import io
from typing import IO, Any, TypeAlias

from aiofiles.threadpool import wrap
from aiofiles.threadpool.binary import AsyncBufferedIOBase, AsyncBufferedReader, AsyncFileIO
from aiofiles.threadpool.text import AsyncTextIOWrapper

__all__ = ("AsyncFile", "underlying", "wrap_file")

#: Any handle atempstore returns for reading or writing.
AsyncFile: TypeAlias = AsyncTextIOWrapper | AsyncBufferedIOBase | AsyncBufferedReader | AsyncFileIO


def wrap_file(file: IO[Any]) -> AsyncFile:
    """Wrap an open file object in the matching aiofiles class."""
    handle: AsyncFile = wrap(file)
    return handle


def underlying(handle: AsyncFile) -> io.IOBase:
    """The synchronous file object behind an aiofiles handle."""
    # aiofiles keeps the file object there and offers no public accessor.
    raw: io.IOBase = handle._file  # type: ignore[union-attr]
    return raw
