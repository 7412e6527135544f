"""`open_atomic`: a file that appears whole or not at all (SPEC §1).

Owns the temporary file of one ``open_atomic`` block: where it is created
(beside the target, so that publishing is a rename or link within one file
system), with which mode and owner, and how it is published or removed.  It
is built on the durable primitives of `_durable` (exclusive create, publish by
``link`` or ``rename``, directory fsync) and only adds what is particular to
replacing a user's file: `_copy_owner_and_mode`.  Kept apart from the locks
because it takes no lock: portalocker happens to ship it, so SPEC lists it
with them and `_locks` re-exports it.

Every syscall runs in a worker thread, one hop to enter the block and one to
leave it; a cancelled caller of the first hop gets nothing and leaves nothing
(``undo=``), and a block that ended cleanly is published whole even if a
cancellation arrives meanwhile (``shield=True``).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import IO, Any, Literal, overload

from aiofiles.threadpool.binary import AsyncBufferedIOBase
from aiofiles.threadpool.text import AsyncTextIOWrapper

from ._durable import (
    create_exclusive,
    fsync_dir,
    publish_link,
    publish_replace,
    temp_name,
    unlink_quietly,
)
from ._handles import wrap_file
from ._threads import run_sync

__all__ = ("open_atomic",)


class _AtomicFile:
    """The temporary file behind one `open_atomic` block (blocking helpers)."""

    __slots__ = ("final", "tmp")

    def __init__(self, final: str) -> None:
        self.final = final
        self.tmp = ""

    def create(self, binary: bool, overwrite: bool) -> IO[Any]:
        # abspath may call getcwd(): resolve here, in the worker thread.
        self.final = os.path.abspath(self.final)
        self.tmp = temp_name(self.final)
        if not overwrite and os.path.lexists(self.final):
            raise FileExistsError(
                errno.EEXIST,
                "open_atomic will not replace an existing file (pass overwrite=True)",
                self.final,
            )
        try:
            existing: os.stat_result | None = os.stat(self.final)
        except FileNotFoundError:  # (or a dangling symlink: replaced by a new file)
            existing = None
        # A new file gets 0666 & ~umask, like a plain open().  A replaced one
        # keeps its mode and owner: created 0600, so the data written in the
        # block is never more exposed than the target's (issue 11: a 0600
        # file came back 0644).
        fd = create_exclusive(self.tmp, 0o666 if existing is None else 0o600)
        try:
            if existing is not None:
                _copy_owner_and_mode(fd, existing)
            return os.fdopen(fd, "wb" if binary else "w")
        except BaseException:
            os.close(fd)
            unlink_quietly(self.tmp)
            raise

    def publish(self, file: IO[Any], overwrite: bool, durable: bool) -> None:
        try:
            try:
                file.flush()
                if durable:
                    os.fsync(file.fileno())
            finally:
                file.close()
            if overwrite:
                publish_replace(self.tmp, self.final)
            else:
                try:
                    publish_link(self.tmp, self.final)
                except FileExistsError as exc:
                    raise FileExistsError(
                        errno.EEXIST,
                        "open_atomic will not replace a file that appeared meanwhile"
                        " (pass overwrite=True)",
                        self.final,
                    ) from exc
        except BaseException:
            unlink_quietly(self.tmp)
            raise
        if durable:
            fsync_dir(os.path.dirname(self.final) or ".")

    def abort(self, file: IO[Any]) -> None:
        try:
            file.close()
        finally:
            unlink_quietly(self.tmp)


def _copy_owner_and_mode(fd: int, target: os.stat_result) -> None:
    """Give the file ``fd`` the owner (where permitted) and mode of ``target``."""
    mode = stat.S_IMODE(target.st_mode)
    mine = os.fstat(fd)
    if (mine.st_uid, mine.st_gid) != (target.st_uid, target.st_gid):
        try:
            os.fchown(fd, target.st_uid, target.st_gid)  # chown clears set-id bits: first
        except PermissionError:
            # Not root: keep at least the group if we are one of its members,
            # and never hand out set-user/group-id bits on a file of ours.
            mode &= ~(stat.S_ISUID | stat.S_ISGID)
            with suppress(PermissionError):
                os.fchown(fd, -1, target.st_gid)
    os.fchmod(fd, mode)


@overload
def open_atomic(
    filename: str | os.PathLike[str],
    binary: Literal[True] = ...,
    *,
    overwrite: bool = ...,
    durable: bool = ...,
) -> AbstractAsyncContextManager[AsyncBufferedIOBase]: ...


@overload
def open_atomic(
    filename: str | os.PathLike[str],
    binary: Literal[False],
    *,
    overwrite: bool = ...,
    durable: bool = ...,
) -> AbstractAsyncContextManager[AsyncTextIOWrapper]: ...


def open_atomic(
    filename: str | os.PathLike[str],
    binary: bool = True,
    *,
    overwrite: bool = False,
    durable: bool = True,
) -> AbstractAsyncContextManager[Any]:
    """Write a file that appears whole or not at all.

    Yields an aiofiles handle on a temporary file in the target's directory.
    On a clean exit the data is flushed and fsynced, the file is published
    (never replacing an existing target unless ``overwrite``; then atomically),
    and the directory is fsynced.  If the block raises, the temporary file is
    removed and the target is untouched.  ``durable=False`` skips both fsyncs.

    Example:
        ```python
        async with open_atomic("config.json", binary=False, overwrite=True) as fh:
            await fh.write(json.dumps(config))
        ```
    """
    return _open_atomic(os.fspath(filename), binary, overwrite, durable)


@asynccontextmanager
async def _open_atomic(
    final: str, binary: bool, overwrite: bool, durable: bool
) -> AsyncIterator[Any]:
    atomic = _AtomicFile(final)
    # A cancelled caller never sees the file: undo removes it (issue 11: the
    # fd and a hidden temp file leaked in 47 of 300 cancellations).
    file = await run_sync(atomic.create, binary, overwrite, undo=atomic.abort)
    handle = wrap_file(file)
    try:
        yield handle
    except BaseException:
        # shield: even in a cancelled scope (anyio cancels every await in it)
        # the temporary file is removed.
        await run_sync(atomic.abort, file, shield=True)
        raise
    # The block ended cleanly: publish whole, even if a cancellation arrives now.
    await run_sync(atomic.publish, file, overwrite, durable, shield=True)
